"""hvlab's own record types: optional (bit 31 set), so other stream readers skip them.

- `HVLAB_DOMAIN`: hvlab state Xen's records do not carry, as JSON (saved images and the
  live-update hand-over; docs/images.md).
- `HVLAB_FRAMES`, `HVLAB_TYPEINFO`, `HVLAB_TABLES`, `HVLAB_P2M`: the live-update
  hand-over's ownership runs, per-frame type state, page-table list and an HVM
  domain's P2M (hypervisor/liveupdate/handover.py).
- `HVLAB_MACHINE_FRAMES`: in a saved CPL-3 (Linux) image, the machine frames its pfns
  and hypervisor pages lived on, as JSON, so a restore can put them back there
  (hypervisor/pv/xen/image.py).
"""

HVLAB_DOMAIN_RECORD = 0x8000_4801
HVLAB_FRAMES_RECORD = 0x8000_4802
HVLAB_TYPEINFO_RECORD = 0x8000_4803
HVLAB_TABLES_RECORD = 0x8000_4804
HVLAB_P2M_RECORD = 0x8000_4805
HVLAB_MACHINE_FRAMES_RECORD = 0x8000_4806

PAGE_DATA_BATCH = 1024  # pfns per PAGE_DATA record written, as libxc
