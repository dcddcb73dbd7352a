from tutor_wrap.cli import main

raise SystemExit(main())
