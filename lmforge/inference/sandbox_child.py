"""The child side of lmforge's Python sandbox: builds the sandbox around itself, then runs the snippet.

lmforge.inference.sandbox starts this file with the base interpreter in isolated mode
(`python -I -S sandbox_child.py CONFIG`, the snippet on stdin, an empty environment). It imports
nothing but the standard library, because it runs outside the project's environment; the snippet
sees the standard library only (no site-packages: -S also keeps start-up fast). Steps:

1. rlimits: CPU seconds, address space, file size, open files, no core files.
2. unshare(2) into new user, mount, network, pid, ipc, uts and cgroup namespaces, mapping the
   caller's uid/gid to 0 inside (only that one id exists in the namespace).
3. fork: the child is pid 1 of the new pid namespace (when it dies the kernel kills everything
   left in it) and gets SIGKILL if this launcher dies; the launcher only waits and reports.
4. In the child: a fresh tmpfs as the root, holding read-only bind mounts of the Python
   installation, the folders of the shared libraries the interpreter has mapped, the loader's
   cache and a few /dev nodes, plus a size-limited tmpfs as the working folder; pivot_root into
   it, detach the old root, remount the new root read-only.
5. Drop every capability, set no_new_privs and install a seccomp-BPF filter (checked against
   the architecture) that makes fork/vfork/clone (threads excepted)/clone3/execve/execveat,
   socket, ptrace, mount and the other namespace, module, key and io_uring calls, and
   memfd_create (memory outside the address-space limit), fail with EPERM.
6. Tell the parent the sandbox is ready (a marker on stdout), then run the snippet.

If a step fails the child writes `sandbox: <reason>` to stderr and exits without running the
snippet; the parent turns that into a refusal.
"""
import ctypes
import json
import os
import resource
import signal
import struct
import sys

READY = b"\0lmforge-sandbox-ready\n"
REFUSED_STATUS = 125

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
CLONE_NEW_ANY = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                 | CLONE_NEWNET | 0x80)  # 0x80: CLONE_NEWTIME
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 22, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL, SECCOMP_MODE_FILTER = 4, 2
EPERM, ENOSYS, EINVAL = 1, 38, 22

# Per architecture: the audit arch seccomp reports, pivot_root's number, and the numbers of the
# denied system calls (from the kernel's unistd headers; aarch64 uses the generic table and has no
# fork/vfork). clone and clone3 are handled separately (threads must keep working).
SYSCALLS = {
    "x86_64": {
        "audit_arch": 0xC000003E, "pivot_root": 155, "capset": 126, "clone": 56, "clone3": 435,
        "deny": {
            "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "socket": 41, "ptrace": 101,
            "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
            "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "keyctl": 250, "add_key": 248,
            "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246,
            "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
            "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170, "setdomainname": 171,
            "acct": 163, "quotactl": 179, "quotactl_fd": 443, "open_by_handle_at": 304,
            "name_to_handle_at": 303, "iopl": 172, "ioperm": 173, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
            "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
            "pidfd_getfd": 438, "setsid": 112, "setpgid": 109, "personality": 135, "kcmp": 312,
            "fanotify_init": 300, "lookup_dcookie": 212, "uselib": 134, "vhangup": 153, "syslog": 103,
            "memfd_create": 319, "memfd_secret": 447,
        },
    },
    "aarch64": {
        "audit_arch": 0xC00000B7, "pivot_root": 41, "capset": 91, "clone": 220, "clone3": 435,
        "deny": {
            "execve": 221, "execveat": 281, "socket": 198, "ptrace": 117, "process_vm_readv": 270,
            "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
            "unshare": 97, "setns": 268, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
            "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104, "kexec_file_load": 294,
            "init_module": 105, "finit_module": 273, "delete_module": 106, "swapon": 224, "swapoff": 225,
            "reboot": 142, "sethostname": 161, "setdomainname": 162, "acct": 89, "quotactl": 60,
            "quotactl_fd": 443, "open_by_handle_at": 265, "name_to_handle_at": 264, "io_uring_setup": 425,
            "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
            "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
            "pidfd_getfd": 438, "setsid": 157, "setpgid": 154, "personality": 92, "kcmp": 272,
            "fanotify_init": 262, "lookup_dcookie": 18, "vhangup": 58, "syslog": 116, "memfd_create": 279,
            "memfd_secret": 447,
        },
    },
}


class Refused(Exception):
    """A sandbox layer could not be set up: the snippet must not run."""


libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> int:
    if result == -1:
        errno = ctypes.get_errno()
        raise Refused(f"{what}: {os.strerror(errno)}")
    return result


def set_limits(config: dict) -> None:
    for name, value in [("RLIMIT_CPU", config["cpu_seconds"]), ("RLIMIT_AS", config["memory_mb"] << 20),
                        ("RLIMIT_FSIZE", config["file_mb"] << 20), ("RLIMIT_NOFILE", config["open_files"]),
                        ("RLIMIT_CORE", 0)]:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except ValueError as e:  # above this account's own hard limit
            raise Refused(f"cannot set {name} to {value}: {e}") from None


def enter_namespaces() -> None:
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    if libc.unshare(flags) == -1:
        errno = ctypes.get_errno()
        raise Refused(f"cannot create namespaces (unshare: {os.strerror(errno)}); user namespaces may be "
                      f"disabled (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces or an "
                      f"AppArmor/SELinux policy)")
    try:
        for name, text in [("uid_map", f"0 {uid} 1"), ("setgroups", "deny"), ("gid_map", f"0 {gid} 1")]:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        raise Refused(f"cannot map ids into the user namespace: {e}") from None


def mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def locked_flags(path: str) -> int:
    """The mount flags of `path` a remount inside a user namespace must keep (the kernel refuses to
    clear nosuid/nodev/noexec or change the atime mode of a mount inherited from outside)."""
    f = os.statvfs(path).f_flag
    flags = 0
    for st, ms in [("ST_NOSUID", MS_NOSUID), ("ST_NODEV", MS_NODEV), ("ST_NOEXEC", MS_NOEXEC),
                   ("ST_NOATIME", MS_NOATIME), ("ST_NODIRATIME", MS_NODIRATIME), ("ST_RELATIME", MS_RELATIME)]:
        if f & getattr(os, st, 0):
            flags |= ms
    return flags


def submounts(path: str) -> list[str]:
    """Mount points strictly below `path` (a recursive bind copies them; each needs its own remount)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")  # octal escapes such as \040
            if point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return found


def bind(path: str, root: str, writable: bool = False) -> None:
    """Make `path` (file or folder) visible at the same place under `root`, read-only unless
    `writable`. Symlinks along the path are recreated, so /lib -> usr/lib keeps working."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:i])
        if os.path.islink(prefix):
            link = root + prefix
            if not os.path.lexists(link):
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(os.readlink(prefix), link)
            return bind(os.path.join(os.path.realpath(prefix), *parts[i:]), root, writable)
    target = root + path
    if os.path.exists(target) and os.path.ismount(target):
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    if libc.mount(os.fsencode(path), os.fsencode(target), None, ctypes.c_ulong(MS_BIND), None) == -1:
        # a plain bind is refused when it would uncover what a mount below hides: bind recursively
        mount(path, target, None, MS_BIND | MS_REC)
    if not writable:
        for point in [target] + submounts(target):
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | locked_flags(point))


def readable_paths() -> list[str]:
    """What the snippet may read: the Python installation, the folders of every shared library
    this interpreter has mapped (the extension modules' libraries live there too), the loader's
    cache and harmless devices."""
    paths = {sys.prefix, sys.exec_prefix}  # as sys.path spells them: bind() recreates symlinks on the way
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and not fields[5].endswith("(deleted)\n"):
                paths.add(os.path.dirname(os.path.realpath(fields[5].rstrip("\n"))))
    paths |= {p for p in ("/etc/ld.so.cache",) if os.path.exists(p)}
    paths = sorted(p for p in paths if os.path.exists(p))
    # drop folders already inside another one
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


DEVICES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]


def build_root(config: dict, readable: list[str]) -> None:
    root, work = config["root"], config["work"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks out, nothing from outside leaks in
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in readable:
        bind(path, root)
    for dev in DEVICES:
        if os.path.exists(dev):
            bind(dev, root, writable=True)
    # top-level links such as /lib -> usr/lib, for paths in the loader's cache
    for name in ("lib", "lib32", "lib64", "libx32"):
        if os.path.islink("/" + name) and not os.path.lexists(root + "/" + name):
            os.symlink(os.readlink("/" + name), root + "/" + name)
    os.makedirs(root + work, exist_ok=True)
    mount("tmpfs", root + work, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={config['folder_mb']}m,nr_inodes=16384,mode=0700")
    os.chdir(root)
    check(libc.syscall(ctypes.c_long(config["syscalls"]["pivot_root"]), b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    check(libc.sethostname(b"sandbox", 7), "sethostname")
    os.chdir(work)


def drop_capabilities(table: dict) -> None:
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == -1:
            if ctypes.get_errno() == EINVAL:  # past the last capability this kernel knows
                break
            check(-1, "drop capability")
    check(libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0), "clear ambient capabilities")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (two 32-bit words each): none
    check(libc.syscall(ctypes.c_long(table["capset"]), header, data), "capset")


# classic BPF opcodes
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000


def seccomp_program(table: dict) -> bytes:
    """The filter: wrong architecture -> kill; clone3 -> ENOSYS (libc then falls back to clone);
    clone without CLONE_THREAD or with a new-namespace flag -> EPERM; listed calls -> EPERM;
    everything else allowed."""
    deny, allow = "deny", "allow"
    prog = [(LD_ABS, 0, 0, 4),  # seccomp_data.arch
            (JEQ, 1, 0, table["audit_arch"]),
            (RET, 0, 0, RET_KILL_PROCESS),
            (LD_ABS, 0, 0, 0)]  # seccomp_data.nr
    if table["audit_arch"] == SYSCALLS["x86_64"]["audit_arch"]:
        prog.append((JGE, deny, 0, 0x40000000))  # the x32 ABI's numbers
    prog += [(JEQ, 0, 1, table["clone3"]), (RET, 0, 0, RET_ERRNO | ENOSYS),
             (JEQ, 0, 3, table["clone"]), (LD_ABS, 0, 0, 16),  # low half of args[0]: the flags
             (JSET, deny, 0, CLONE_NEW_ANY),
             (JSET, allow, deny, CLONE_THREAD)]
    prog += [(JEQ, deny, 0, nr) for nr in sorted(set(table["deny"].values()))]
    prog += [(RET, 0, 0, RET_ALLOW), (RET, 0, 0, RET_ERRNO | EPERM)]
    targets = {allow: len(prog) - 2, deny: len(prog) - 1}
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt, jf = (targets[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        assert 0 <= jt < 256 and 0 <= jf < 256
        out.append(struct.pack("HBBI", code, jt, jf, k))
    return b"".join(out)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(table: dict) -> None:
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")
    program = seccomp_program(table)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), 0, 0), "seccomp")


def refuse(reason: str) -> None:
    os.write(2, f"sandbox: {reason}\n".encode())
    os._exit(REFUSED_STATUS)


def run_snippet(code: str) -> None:
    """Run the snippet as __main__; a traceback shows the snippet's frames only."""
    import site

    site.setquit()  # exit() and quit(), which -S leaves out
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<tool>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - reported to the model like Python would
        import traceback

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        sys.stderr.flush()
        sys.exit(1)


def report(pid: int, config: dict) -> None:
    """Wait for the sandboxed child and exit the way it did, explaining deaths by signal."""
    _, status, usage = os.wait4(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        # RLIMIT_CPU kills with SIGKILL; rusage is sampled at ticks and reads low with threads
        if sig in (signal.SIGKILL, signal.SIGXCPU) and usage.ru_utime + usage.ru_stime >= config["cpu_seconds"] / 2:
            message = f"error: CPU-time limit of {config['cpu_seconds']} s exceeded"
        else:
            message = f"error: killed by {signal.Signals(sig).name}"
        os.write(2, f"\n{message}\n".encode())
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main() -> None:
    config = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    os.umask(0o022)
    machine = os.uname().machine
    table = SYSCALLS.get(machine)
    if table is None:
        refuse(f"no seccomp syscall table for the {machine} architecture (x86_64 and aarch64 only)")
    config["syscalls"] = table
    try:
        readable = readable_paths()
        set_limits(config)
        enter_namespaces()
    except (Refused, OSError) as e:
        refuse(str(e))
    pid = os.fork()
    if pid:
        report(pid, config)
    try:
        check(libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0), "parent-death signal")
        try:
            build_root(config, readable)
        except (Refused, OSError) as e:
            raise Refused(f"cannot build the sandbox's file system ({e}); a security policy may restrict "
                          f"user namespaces (e.g. Ubuntu's kernel.apparmor_restrict_unprivileged_userns)") from None
        os.closerange(3, 1 << 20)  # nothing inherited (an fd opened before the rlimit could lie above it)
        drop_capabilities(table)
        install_seccomp(table)
    except (Refused, OSError) as e:
        refuse(str(e))
    os.write(1, READY)
    run_snippet(code)


if __name__ == "__main__":
    main()
