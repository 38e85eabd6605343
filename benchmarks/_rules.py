"""The rule settings every framework's benchmark times, defined once so that their tables compare."""

RULES = [
    ("sgd", {}),
    ("sam", {"rho": 0.05}),
    ("gnp", {"r": 0.05, "alpha": 0.8}),
    ("fd_gr", {"gamma": 0.05, "eps": 0.01}),
    ("gam", {}),
    ("flooding", {"b": 0.01}),
    ("coherent", {"lam": 1e-4, "threshold": 0.0}),
    ("gr", {"gamma": 0.05}),
]
