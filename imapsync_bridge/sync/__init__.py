"""The patent's sync logic as pure functions over plain data: no I/O, no network imports.

- :mod:`.session`    the session itself (FIG. 3) as an I/O-free flow of steps
- :mod:`.merge`      update sync: ledger + both sides now -> both action lists (FIGs. 5-8)
- :mod:`.normalize`  normalize and pull into the bounded phone window (FIGs. 9-10)
- :mod:`.breaker`    the mass-delete breaker
- :mod:`.ledger`     keeping the ledger bounded
- :mod:`.ops`        the actions themselves
"""
