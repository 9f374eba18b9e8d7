"""Empirical privacy audits: does the code do what the accountant was told? (docs/audit.md)

one_run.py   the one-run audit (Steinke, Nasr, Jagielski 2023): gross bugs, in about a minute
trials.py    the many-trial audit (Jagielski et al. 2020; Nasr et al. 2021): each mechanism as it
             is and with known bugs, through its production functions
bounds.py    its statistics: Clopper-Pearson, eps at delta, the trade-off test of the claim
variants.py  the mechanisms as the trials run them, and broken copies that measure the power
ledger.py    train.py's own ledger against what its mechanisms were called with
__main__.py  the command line: python -m audit [--trials | --ledger]
"""
