"""Planning: the memory model, the planner, distributed settings, RAM/disk budgets and preflight verdicts."""
