"""The GGUF half's speed on each llama.cpp build: the CPU build against a GPU build (CUDA, HIP or Vulkan).

    .venv/bin/python bench/gguf_backends.py GGUF [--build DIR ...] [--ctx 512] [--repeats 5]

For the default build (.cache/llama.cpp, or LLAMA_CPP_DIR) and each `--build DIR` (a llama.cpp tree with a build,
e.g. .cache/llama.cpp-vulkan/src): one llama-server with the layers placed as the pipeline places them
(backends/llamacpp.placement: all on the build's devices when they fit), then `repeats` times the server's own
timing of a 16-token generation after a 64-token prompt (Server.speed). Prints the median generation and prompt
tokens per second per build and the ratio to the first. The device variables (CUDA_VISIBLE_DEVICES,
GGML_VK_VISIBLE_DEVICES, ...) apply as they do to a run. Results go to bench/results/gguf_backends.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tutor_wrap.backends import llamacpp  # noqa: E402
from tutor_wrap.backends.llama_server import serve  # noqa: E402
from tutor_wrap.machine.tools import _from_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--build", type=Path, action="append", default=[], help="another llama.cpp tree with a build")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    builds = [("default", llamacpp.locate())]
    for d in a.build:
        ll = _from_dir(d.resolve(), str(d))
        if ll is None:
            sys.exit(f"{d}: no llama.cpp tree with a build (convert_hf_to_gguf.py and build/bin/llama-quantize)")
        builds.append((str(d), ll))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ll in builds:
            placed = llamacpp.placement(ll, a.gguf, a.ctx)
            with serve(ll, a.gguf, ctx=a.ctx, log=Path(tmp) / "server.log", gpu_layers=placed.gpu_layers) as s:
                runs = [s.speed(a.ctx) for _ in range(a.repeats)]
            rows.append({"build": name, "backend": ll.backend, "gpu_layers": placed.gpu_layers, "placement": placed.why,
                         "gen_tps_median": statistics.median(r[0] for r in runs),
                         "prompt_tps_median": statistics.median(r[1] for r in runs), "runs": runs})
    first = rows[0]
    for r in rows:
        print(f"{r['build']:40} {r['backend'] or '?':7} ngl {r['gpu_layers']:3}  generation {r['gen_tps_median']:8.1f} "
              f"tok/s (x{r['gen_tps_median'] / first['gen_tps_median']:.3f})  prompt {r['prompt_tps_median']:8.1f} "
              f"tok/s (x{r['prompt_tps_median'] / first['prompt_tps_median']:.3f})")
    out = REPO / "bench" / "results" / "gguf_backends.json"
    out.write_text(json.dumps({"gguf": str(a.gguf), "ctx": a.ctx, "repeats": a.repeats, "rows": rows}, indent=2))
    print(f"results: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
