"""The stages, one module each (base.py: what they share).

ORDER is the one list of them, in the order they run: (stage name, module). pipeline.py imports the modules from
it; the command line takes the names for --from/--until from here without importing any stage (`--help` stays
instant). Adding a stage: its module, and its place here.
"""

ORDER: tuple[tuple[str, str], ...] = (
    ("plan", "plan"), ("train", "train"), ("merge", "merge"), ("export", "export"), ("deploy", "deploy"),
    ("eval", "evaluate"),
)
NAMES = tuple(name for name, _ in ORDER)
