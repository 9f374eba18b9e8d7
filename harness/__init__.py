"""What keeps a run safe but is not the method: the machinery beside the science modules.

    flags.py   train.py's flags, every command line's bounds and device check, resume rules
    runs.py    the run folder and its lock, atomic writes, checksummed checkpoints, the report,
               progress lines in blocks, Ctrl-C and signals
    launch.py  train.py's command line: a new or resumed run, its checks, its exit statuses
    team.py    DP-SGD on several processes (torchrun) with the privacy of one
    data.py    the datasets' official files (checked), PNG pictures
    files.py   the samples file (train.py and sample.py write it, evaluate.py reads it), .npz
               archives read in one line or refused, a path's writability checked first
    commands.py  the command lines of accountant.py and central.py
    cli.py     one-line errors and exit status 2, Ctrl-C while a command loads
"""
