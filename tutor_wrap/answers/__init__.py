"""Eval's answer checks: what an answer must look like or do, judged on its text. check.py is the interface,
registry.py the list a recipe's `eval.checks` may name; one module per check (form.py holds the three one-liners)."""
