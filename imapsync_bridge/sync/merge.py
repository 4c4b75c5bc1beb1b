"""Update sync (patent FIGs. 5-8): compare both sides with the ledger, plan both action lists.

For every message either side still cares about, the ledger says where it was and which
flags it had when the last sync completed; each side's current fact says where it is now.
A side *changed* a message when its fact differs from the ledger. One side's change is
carried to the other; when both changed the same message, DESIGN.md's rules decide,
and no rule loses data:

- restore beats delete (a message wanted in an inbox by one side stays in both inboxes),
- restore beats destroy (the surviving copy is put back where the other side lost it),
- delete beats a flag change (the flag is kept, in Trash),
- a flag *set* beats a flag *unset* (for ``\\Seen`` and ``\\Flagged`` alike).

A message the phone no longer holds without a tombstone (evicted from the window, dropped
by the phone trash's garbage collector) is *not* a delete: the ledger's ``phone`` goes to
GONE and the desktop is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from imapsync_bridge.model import DesktopFact, FlagChange, Flags, LedgerEntry, PhoneFact, Where
from imapsync_bridge.sync.ops import (
    AppendToDesktop,
    DesktopAction,
    DestroyOnDesktop,
    DestroyOnPhone,
    MoveOnDesktop,
    MoveOnPhone,
    PhoneAction,
    SetDesktopFlags,
    SetPhoneFlags,
)

_HELD = (Where.INBOX, Where.TRASH)
_ABSENT = PhoneFact(Where.GONE)


@dataclass
class MergePlan:
    desktop: list[DesktopAction] = field(default_factory=list)
    phone: list[PhoneAction] = field(default_factory=list)
    ledger: dict[str, LedgerEntry] = field(default_factory=dict)
    desktop_deletions: int = 0  # mapped messages the desktop deleted or destroyed


def keys_in_scope(
    ledger: Mapping[str, LedgerEntry],
    phone: Mapping[str, PhoneFact],
    destroyed_on_phone: Iterable[str] = (),
) -> set[str]:
    """Keys whose desktop location the agent must find before :func:`merge`.

    Messages the phone does not hold (evicted, or trashed long ago) are out of scope:
    whatever the desktop does with them cannot change the phone; what the phone user
    destroyed is in it (the desktop copy goes too).
    """
    keys = {key for key, entry in ledger.items() if entry.phone is not Where.GONE}
    keys.update(phone)
    keys.update(destroyed_on_phone)
    return keys


def _merge_flag(base: bool | None, desktop: bool, phone: bool) -> bool:
    if base is None:
        return desktop or phone  # no common past: a set flag wins
    if desktop != base:
        return desktop  # the desktop changed it (if both did, they agree)
    return phone


def merge_flags(base: Flags | None, desktop: Flags, phone: Flags) -> Flags:
    return Flags(
        seen=_merge_flag(base.seen if base else None, desktop.seen, phone.seen),
        flagged=_merge_flag(base.flagged if base else None, desktop.flagged, phone.flagged),
    )


def merge_location(
    base: LedgerEntry | None, desktop: Where, phone: Where, phone_restored: bool = False
) -> Where:
    """Where a message held on both sides ends up (INBOX or TRASH).

    ``phone_restored``: the phone user restored it since the last sync, even if the net
    location did not change (deleted, then restored): that restore beats a delete.
    """
    if base is None or base.phone is Where.GONE:
        return Where.INBOX if Where.INBOX in (desktop, phone) else Where.TRASH
    desktop_moved = desktop is not base.desktop
    phone_moved = phone is not base.phone or phone_restored
    if desktop_moved and not phone_moved:
        return desktop
    if phone_moved and not desktop_moved:
        return phone
    # Both moved, or (after a partial earlier run) neither did but they disagree.
    return Where.INBOX if Where.INBOX in (desktop, phone) else Where.TRASH


def _merge_one(
    key: str, base: LedgerEntry | None, desk: DesktopFact, phone: PhoneFact, plan: MergePlan
) -> None:
    was_mapped = base is not None and base.desktop is Where.INBOX and base.phone is not Where.GONE

    if phone.where is Where.DESTROYED:
        restored_on_desktop = (
            base is not None and base.desktop is Where.TRASH and desk.where is Where.INBOX
        )
        if restored_on_desktop:
            plan.ledger[key] = LedgerEntry(
                key, Where.INBOX, Where.GONE, desk.flags, desk.uid, desk.internaldate
            )
        elif desk.where in _HELD:
            plan.desktop.append(DestroyOnDesktop(key))
        return

    if desk.where is Where.GONE:
        if phone.where not in _HELD:
            return
        restored_on_phone = phone.where is Where.INBOX and (
            phone.restored or (base is not None and base.phone is Where.TRASH)
        )
        if base is None or restored_on_phone:
            # The desktop lacks a message the phone holds (fresh state, or restore beats
            # destroy): put the phone's copy back, so nothing is lost.
            plan.desktop.append(AppendToDesktop(key, phone.flags, phone.where))
            plan.ledger[key] = LedgerEntry(
                key, phone.where, phone.where, phone.flags, None, phone.internaldate
            )
        else:
            plan.phone.append(DestroyOnPhone(key))
            if was_mapped:
                plan.desktop_deletions += 1
        return

    if phone.where is Where.GONE:
        plan.ledger[key] = LedgerEntry(
            key, desk.where, Where.GONE, desk.flags, desk.uid, desk.internaldate
        )
        return

    target = merge_location(base, desk.where, phone.where, phone.restored)
    if desk.where is not target:
        plan.desktop.append(MoveOnDesktop(key, target))
    if phone.where is not target:
        plan.phone.append(MoveOnPhone(key, target))
        if was_mapped and target is Where.TRASH:
            plan.desktop_deletions += 1

    base_flags = base.flags if base is not None and base.phone is not Where.GONE else None
    flags = merge_flags(base_flags, desk.flags, phone.flags)
    if desk.flags != flags:
        plan.desktop.append(SetDesktopFlags(key, FlagChange.between(desk.flags, flags)))
    if phone.flags != flags:
        plan.phone.append(SetPhoneFlags(key, FlagChange.between(phone.flags, flags)))

    uid = desk.uid if desk.where is target else None
    internaldate = desk.internaldate or phone.internaldate
    plan.ledger[key] = LedgerEntry(key, target, target, flags, uid, internaldate)


def merge(
    ledger: Mapping[str, LedgerEntry],
    desktop: Mapping[str, DesktopFact],
    phone: Mapping[str, PhoneFact],
    destroyed_on_phone: Iterable[str] = (),
) -> MergePlan:
    """Plan the update sync. ``desktop`` must hold a fact for every key in scope.

    Returns both action lists and the ledger as it will be once they are applied.
    Ledger entries out of scope are carried over unchanged.
    """
    phone_now = dict(phone)
    for key in destroyed_on_phone:
        phone_now.setdefault(key, PhoneFact(Where.DESTROYED))
    scope = keys_in_scope(ledger, phone_now)  # the tombstones are in phone_now
    missing = scope - desktop.keys()
    if missing:
        raise ValueError(f"no desktop fact for {len(missing)} message(s) in scope")

    plan = MergePlan(ledger={k: e for k, e in ledger.items() if k not in scope})
    for key in sorted(scope):
        _merge_one(key, ledger.get(key), desktop[key], phone_now.get(key, _ABSENT), plan)
    return plan
