"""Empirical privacy audits: does the code do what the accountant was told?

one_run.py  the one-run audit (Steinke, Nasr, Jagielski 2023): gross bugs, in about a minute
trials.py   the many-trial audit (Jagielski et al. 2020; Nasr et al. 2021): each mechanism as it
            is and with known bugs
__main__.py the command line: `python -m audit`, `python -m audit --trials`
"""
