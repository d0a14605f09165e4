"""Grant table v1 (query_size, setup_table, set_version): a ring-3 kernel and direct calls."""

from __future__ import annotations

import struct

from hypervisor.lib.errno import EINVAL, ENOSYS
from hypervisor.pv.xen import grant_table as gt
from tests.pv.xen.guest import ENTRY, Asm, boot

GRANT_TABLE_OP, UPDATE_VA_MAPPING = 20, 14
MAP_VA = ENTRY + 0x1000  # the second page of the kernel segment: the code fits in the first


def _gnttab(asm: Asm, cmd: int, arg: str, save: str) -> Asm:
    asm.emit("b8").imm32(GRANT_TABLE_OP).emit("bf").imm32(cmd).emit("488d35").rip_rel(arg)
    return asm.emit("ba").imm32(1).emit("0f05").emit(save)  # count 1; then mov rXX, rax


def grant_guest() -> Asm:
    asm = Asm()
    _gnttab(asm, gt.GNTTABOP_QUERY_SIZE, "qs", "4989c4")  # r12
    asm.emit("488d05").rip_rel("flist").emit("488905").rip_rel("st_list")
    _gnttab(asm, gt.GNTTABOP_SETUP_TABLE, "st", "4989c5")  # r13
    _gnttab(asm, gt.GNTTABOP_SET_VERSION, "sv2", "4989c6")  # r14
    _gnttab(asm, gt.GNTTABOP_SET_VERSION, "sv1", "4989c7")  # r15
    # map grant frame 1 at MAP_VA (update_va_mapping with UVMF_INVLPG), then write to it
    asm.emit("488b35").rip_rel("flist1").emit("48c1e60c").emit("4883ce67")
    asm.emit("48bf").imm64(MAP_VA).emit("ba").imm32(2).emit("b8").imm32(UPDATE_VA_MAPPING)
    asm.emit("0f05").emit("4889c3")  # rbx = rc
    asm.emit("48bf").imm64(MAP_VA).emit("c707").imm32(0xC0FFEE)
    asm.shutdown(0)
    while len(asm.code) % 8:
        asm.emit("90")
    asm.label("qs").data(gt.QUERY_SIZE.pack(gt.DOMID_SELF, 0, 0, 99))
    asm.label("st").data(struct.pack("<H2xIh6x", gt.DOMID_SELF, 2, 99))
    asm.label("st_list").data(bytes(8))
    asm.label("flist").data(bytes(8)).label("flist1").data(bytes(8))
    asm.label("sv2").data(struct.pack("<I", 2)).label("sv1").data(struct.pack("<I", 1))
    return asm


def _read(hv, asm: Asm, label: str, size: int) -> bytes:
    return hv.copy_from_guest(hv.domains[0].vcpus[0], ENTRY + asm.labels[label], size)


def test_a_ring3_kernel_sizes_sets_up_and_maps_its_grant_table(tmp_path):
    asm = grant_guest()
    hv = boot(tmp_path, asm.bytes())
    dom = hv.domains[0]
    table = dom.grant_table
    assert len(table.frames) == gt.INITIAL_NR_GRANT_FRAMES and table.version == 0
    assert hv.run(10_000_000) == "shutdown"
    assert dom.shutdown.reason == "poweroff", dom.crash_report
    cpu = hv.pcpus[0]
    assert [cpu.reg(r) for r in ("r12", "r13", "r14", "rbx")] == [0, 0, 2**64 - ENOSYS, 0]
    assert cpu.reg("r15") == 0
    assert gt.QUERY_SIZE.unpack(_read(hv, asm, "qs", 16)) == (
        gt.DOMID_SELF, 1, gt.DEFAULT_MAX_GRANT_FRAMES, gt.GNTST_OKAY)
    _dom, nr, status, _list = gt.SETUP_TABLE.unpack(_read(hv, asm, "st", 24))
    assert (nr, status) == (2, gt.GNTST_OKAY)
    frames = list(struct.unpack("<2Q", _read(hv, asm, "flist", 16)))
    assert frames == table.frames and len(set(frames)) == 2  # the table grew by one frame
    assert all(hv.frame_table.owner_of(f) == dom.domid for f in frames)
    assert frames[0] not in dom.p2m.tolist() and frames[1] not in dom.p2m.tolist()
    assert _read(hv, asm, "sv2", 8) == struct.pack("<II", 1, 1)  # both answer the version: 1
    assert table.version == 1
    written = hv.memory.frame_u8(frames[1])[:4].tobytes()
    assert written == struct.pack("<I", 0xC0FFEE)  # the guest wrote into Xen's grant frame
    assert hv.check_typerefs(dom) == []


class _Guest:
    """Direct calls: guest memory as a bytearray at address 0."""

    def __init__(self, hv):
        self.mem = bytearray(4096)
        self.hv = hv
        hv.copy_from_guest = lambda v, at, n: bytes(self.mem[at:at + n])
        hv.copy_to_guest = lambda v, at, raw: self.mem.__setitem__(slice(at, at + len(raw)), raw)


def test_errors_are_xens(tmp_path):
    hv = boot(tmp_path, Asm().shutdown(0).bytes())
    v = hv.domains[0].vcpus[0]
    table = hv.domains[0].grant_table
    g = _Guest(hv)
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_QUERY_SIZE, 0, 2) == -EINVAL  # count must be 1
    g.mem[0:16] = gt.QUERY_SIZE.pack(7, 0, 0, 0)  # another domain: a domU may not ask
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_QUERY_SIZE, 0, 1) == 0
    assert gt.QUERY_SIZE.unpack(bytes(g.mem[0:16]))[3] == gt.GNTST_BAD_DOMAIN
    g.mem[0:24] = gt.SETUP_TABLE.pack(gt.DOMID_SELF, table.max_frames + 1, 0, 512)
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_SETUP_TABLE, 0, 1) == 0
    assert gt.SETUP_TABLE.unpack(bytes(g.mem[0:24]))[2] == gt.GNTST_GENERAL_ERROR
    assert len(table.frames) == 1  # nothing grew
    g.mem[0:24] = gt.SETUP_TABLE.pack(gt.DOMID_SELF, table.max_frames, 0, 512)
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_SETUP_TABLE, 0, 1) == 0
    assert gt.SETUP_TABLE.unpack(bytes(g.mem[0:24]))[2] == gt.GNTST_OKAY
    assert len(table.frames) == table.max_frames
    assert struct.unpack("<Q", g.mem[512:520])[0] == table.frames[0]
    g.mem[0:4] = struct.pack("<I", 3)
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_SET_VERSION, 0, 1) == -EINVAL
    assert struct.unpack("<I", g.mem[0:4])[0] == 1  # the current version comes back
    assert gt.grant_table_op(hv, v, 9, 0, 1) == -ENOSYS
    hv.domains[0].grant_table = None  # a domain without one: Xen's -ENOSYS for every op
    assert gt.grant_table_op(hv, v, gt.GNTTABOP_QUERY_SIZE, 0, 1) == -ENOSYS
