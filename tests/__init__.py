# A regular package, so `tests.*` imports find this folder even where an installed
# distribution ships its own top-level `tests` package (lmms-eval's dependency
# latex2sympy2 does; a namespace package would lose to it whatever sys.path's order).
