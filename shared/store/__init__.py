"""Runs in Redis, in rooms by what they keep (every Lua script in scripts.py):

=============  ===============================================================================
runs.py        :class:`RunStore`: the run's hash and its transitions (claim, sending, attach,
               finish, cancelling, abandon) and reads; the other rooms hang off it
steps.py       the run's steps (a bounded stream per run)
instances.py   engine instance -> run, what the watcher reads
pages.py       the list of runs, newest first
schedule.py    due-time sets every replica shares (claims to recover, callbacks to deliver)
scripts.py     the Lua, each script with its KEYS and ARGV by name (shared/lua.py)
=============  ===============================================================================
"""
