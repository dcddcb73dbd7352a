"""Foundation every layer may use: errors, units, paths, atomic writes, hashing, subprocess helpers."""
