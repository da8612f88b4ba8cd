"""Runs a command under an OCI seccomp profile, as a container runtime would.

Usage: seccomp_exec.py PROFILE.json COMMAND [ARG...]

Only the shape of profile this deployment ships: defaultAction SCMP_ACT_ALLOW and
rules with SCMP_ACT_ERRNO and no argument filters. The filter is built with
libseccomp (libseccomp2, on every Debian system) through ctypes, loaded without
no_new_privs (as runc does when privilege escalation is allowed), and the command
is exec'd under it. Used by ../check to run a real worker under the profile.
"""

import ctypes
import json
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000
SCMP_FLTATR_CTL_NNP = 3


def main() -> None:
    profile = json.load(open(sys.argv[1]))
    command = sys.argv[2:]
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]

    if profile["defaultAction"] != "SCMP_ACT_ALLOW":
        sys.exit("seccomp_exec: only defaultAction SCMP_ACT_ALLOW is supported")
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx or lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) != 0:
        sys.exit("seccomp_exec: libseccomp refused to start a filter")
    denied = 0
    for rule in profile["syscalls"]:
        if rule["action"] != "SCMP_ACT_ERRNO" or rule.get("args"):
            sys.exit(f"seccomp_exec: unsupported rule {rule}")
        action = SCMP_ACT_ERRNO | rule.get("errnoRet", 1)
        for name in rule["names"]:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == -1:  # not a system call of this architecture
                continue
            if lib.seccomp_rule_add(ctx, action, nr, 0) != 0:
                sys.exit(f"seccomp_exec: cannot add a rule for {name}")
            denied += 1
    if lib.seccomp_load(ctx) != 0:
        sys.exit("seccomp_exec: loading the filter failed")
    print(f"seccomp_exec: {denied} system calls refused", file=sys.stderr)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
