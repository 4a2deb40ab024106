"""
The seccomp filter of the code sandbox (nanochat/execution.py hands it to bubblewrap with `--seccomp FD`): a
classic-BPF program, built here from syscall numbers, that makes the kernel refuse the calls model-written code
never needs and that an escape would: the keyring (keyctl, add_key, request_key: the evaluator's session keyring
and the shared `nobody` user keyring become unreachable, which is stronger than a fresh session keyring), new
namespaces (unshare, setns, and clone with any CLONE_NEW* flag: no user namespace in which to become root and
mount a tmpfs past the sandbox's size limit), mounting, io_uring, perf_event_open, bpf, ptrace and the
cross-process memory calls, memfd_create/memfd_secret (memory that RLIMIT_AS does not count), userfaultfd, module
and kexec loading. A refused call fails with EPERM, so Python raises PermissionError; clone3 fails with ENOSYS,
which makes the C library fall back to clone, whose flags the filter can read (clone3 passes them in memory).
Other architectures than x86_64 and aarch64 get no filter (bwrap_seccomp_filter returns None; the sandbox says so).
Tests: tests/test_sandbox.py (the probes) and tests/test_execution.py (the program's layout).
"""

import errno
import platform
import struct

# syscall numbers: x86_64 from <asm/unistd_64.h>, aarch64 from <asm-generic/unistd.h> (checked against both)
DENIED = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282), "fanotify_init": (300, 262),
    "memfd_create": (319, 279), "memfd_secret": (447, 447),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "acct": (163, 89), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "quotactl": (179, 60),
    "lookup_dcookie": (212, 18),
}
CLONE = (56, 220)
CLONE3 = (435, 435)
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column in DENIED, AUDIT_ARCH_* value
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: the same calls under other numbers, refused as a whole
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (<linux/sched.h>)
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# classic BPF opcodes and seccomp return values (<linux/filter.h>, <linux/seccomp.h>)
LD_ABS_W, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
OFFSET_NR, OFFSET_ARCH, OFFSET_ARG0 = 0, 4, 16  # struct seccomp_data (arg0's low 32 bits: little-endian)


def _assemble(program):
    """[(opcode, k, jump_true_label, jump_false_label) or ("label", name)] -> BPF bytes (8 per instruction).
    Labels are resolved to forward offsets, as BPF jumps only forward."""
    positions, index = {}, 0
    for ins in program:
        if ins[0] == "label":
            positions[ins[1]] = index
        else:
            index += 1
    out, index = [], 0
    for ins in program:
        if ins[0] == "label":
            continue
        code, k, jt, jf = ins
        offsets = [0 if target is None else positions[target] - index - 1 for target in (jt, jf)]
        assert all(0 <= o < 256 for o in offsets), f"jump out of range at instruction {index}"
        out.append(struct.pack("<HBBI", code, offsets[0], offsets[1], k))
        index += 1
    return b"".join(out)


def bwrap_seccomp_filter(machine=None):
    """The filter program for this machine's architecture (platform.machine()), as bytes for bwrap's
    --seccomp, or None where the syscall table is not known here."""
    machine = machine or platform.machine()
    if machine not in ARCHES:
        return None
    column, audit_arch = ARCHES[machine]
    program = [(LD_ABS_W, OFFSET_ARCH, None, None), (JEQ_K, audit_arch, None, "kill"),
               (LD_ABS_W, OFFSET_NR, None, None)]
    if machine == "x86_64":
        program.append((JGE_K, X32_SYSCALL_BIT, "eperm", None))
    program += [(JEQ_K, numbers[column], "eperm", None) for numbers in DENIED.values()]
    program += [(JEQ_K, CLONE3[column], "enosys", None), (JEQ_K, CLONE[column], "clone", None),
                (RET_K, RET_ALLOW, None, None),
                ("label", "clone"), (LD_ABS_W, OFFSET_ARG0, None, None), (JSET_K, CLONE_NEW_FLAGS, "eperm", None),
                (RET_K, RET_ALLOW, None, None),
                ("label", "eperm"), (RET_K, RET_ERRNO | errno.EPERM, None, None),
                ("label", "enosys"), (RET_K, RET_ERRNO | errno.ENOSYS, None, None),
                ("label", "kill"), (RET_K, RET_KILL_PROCESS, None, None)]
    return _assemble(program)
