"""Xen migration stream v2 (libxc layer): byte-exact reader and writer.

Stored guest images and the live-update hand-over both use this format (see
docs/design.md §3).  Modules:

* :mod:`.framing` -- constants, image/domain headers, :class:`StreamError`, ``check_pfns``
* :mod:`.records` -- typed records and their body codecs
* :mod:`.reader` / :mod:`.writer` -- streaming :class:`StreamReader` / :class:`StreamWriter`
* :mod:`.files` -- ``open_image_for_read`` / ``open_image_for_write`` (plain or ``.zst``)
* :mod:`.vcpu_context` -- x86_64 PV ``vcpu_guest_context``
* :mod:`.hvm_records` -- the HVM_CONTEXT save-record container, CPU and LAPIC codecs
"""

from .files import open_image_for_read, open_image_for_write
from .framing import (
    IHDR_VERSION,
    MAX_BATCH_SIZE,
    PAGE_SIZE,
    DomainHeader,
    DomainType,
    ImageHeader,
    Pfinfo,
    RecordType,
    StreamError,
    check_pfns,
    pfinfo_has_data,
    record_type_name,
)
from .hvm_records import (
    HvmContext,
    HvmHwCpu,
    HvmHwLapic,
    HvmHwLapicRegs,
    HvmRecord,
    HvmSaveHeader,
    iter_hvm_context,
    pack_hvm_context,
)
from .reader import OpaqueRecord, SkippedRecord, StreamReader
from .records import (
    CheckpointRecord,
    EndRecord,
    HvmContextRecord,
    HvmParamsRecord,
    PageDataRecord,
    Record,
    SharedInfoRecord,
    StaticDataEndRecord,
    VerifyRecord,
    X86CpuidPolicyRecord,
    X86MsrPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuBasicRecord,
    X86PvVcpuExtendedRecord,
    X86PvVcpuMsrsRecord,
    X86PvVcpuRecord,
    X86PvVcpuXsaveRecord,
    X86TscInfoRecord,
)
from .vcpu_context import CpuUserRegs, TrapInfo, VcpuGuestContext
from .writer import StreamWriter

__all__ = [
    "IHDR_VERSION", "MAX_BATCH_SIZE", "PAGE_SIZE",
    "DomainHeader", "DomainType", "ImageHeader", "Pfinfo", "RecordType", "StreamError",
    "check_pfns", "pfinfo_has_data", "record_type_name",
    "StreamReader", "SkippedRecord", "OpaqueRecord", "StreamWriter",
    "open_image_for_read", "open_image_for_write",
    "Record", "PageDataRecord", "X86PvInfoRecord", "X86PvP2mFramesRecord", "X86PvVcpuRecord",
    "X86PvVcpuBasicRecord", "X86PvVcpuExtendedRecord", "X86PvVcpuXsaveRecord",
    "X86PvVcpuMsrsRecord", "SharedInfoRecord", "X86TscInfoRecord", "HvmContextRecord",
    "HvmParamsRecord", "X86CpuidPolicyRecord", "X86MsrPolicyRecord", "EndRecord",
    "VerifyRecord", "CheckpointRecord", "StaticDataEndRecord",
    "VcpuGuestContext", "CpuUserRegs", "TrapInfo",
    "HvmContext", "HvmHwCpu", "HvmHwLapic", "HvmHwLapicRegs", "HvmRecord", "HvmSaveHeader",
    "iter_hvm_context", "pack_hvm_context",
]  # fmt: skip
