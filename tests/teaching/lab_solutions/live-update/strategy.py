"""Reference solution of lab live-update (the tests grade it: full marks)."""

from hypervisor.mm.errors import ERESTART


def full_walk_domain(typing, domid, roots):
    for root in roots:
        while True:
            if root.pinned:
                rc = typing.pin_table(root.mfn, root.level, domid)
            else:
                rc = typing.get_root_ref(root.mfn, domid)
            if rc != -ERESTART:
                break
        if rc != 0:
            raise RuntimeError(f"domain {domid}: root {root} refused ({rc})")
