"""Lab live-update: the full walk, in the new build (read README.md first).

hvlab calls `full_walk_domain(typing, domid, roots)` once per PV domain in
the new build, during the blackout, after the domain's frames are given back
to it (owned, but with no type and no reference) and before its vCPUs run:

    typing  the new build's PageTyping (hypervisor/mm/typerefs.py)
    domid   the domain
    roots   what anchored the domain's page tables in the old build, as
            typerefs.Root(mfn, level, pinned): the pinned tables (pinned=True,
            level 1..4) first, then one per vCPU CR3 (pinned=False, level 4)

Rebuild every typeref from them: a pin is `typing.pin_table(mfn, level,
domid)`, a CR3 reference `typing.get_root_ref(mfn, domid)`; each returns 0,
-ERESTART (validation stopped part way: call again, it continues) or a
negative errno (refused). Validating a root validates everything below it.
A refused root means the old build's tables are not what it said: raise an
exception naming the root, so that the update fails loudly.
"""

from hypervisor.mm.errors import ERESTART  # noqa: F401 - you will need it


def full_walk_domain(typing, domid, roots):
    for root in roots:
        if root.pinned:
            typing.pin_table(root.mfn, root.level, domid)
    # TODO: the CR3 references, -ERESTART, and refused roots
