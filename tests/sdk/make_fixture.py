#!/usr/bin/env python3
"""Create the differential test's fixture tree in DIR (created; must not exist or be empty).

The tree is byte-for-byte and mtime-for-mtime identical on every run, so the SDK side
and the hands side each start from their own fresh copy of the same state. It holds
one file for every path the six tools treat differently: text with several lines,
repeated strings for edit, nested and unicode names, a dotfile, a `.gitignore` and
an `.ignore` (rg, and so hands' grep, honours the first only in a git repository and
the second always), binary and invalid UTF-8 content, a PNG, a PDF
and a text file with an image extension, a file over the 262144-byte text cap and a
single line over it, an empty file, symlinks (inside, outside, dangling, to a
directory) and a FIFO.

mtimes: glob sorts by modification time, newest first, and keeps walk (readdir) order
for ties, which differs between filesystems. So every entry gets its own mtime, in an
order unrelated to names (so a name-sorted result cannot pass for a time-sorted one),
set in a final pass after all writes since writing into a directory changes its mtime.
Two ties cannot be avoided and cases must not depend on them: glob stats through
symlinks, so `link_inside` ties with its target and `link_dir` with its target
directory (they live in different directories, so only `**` patterns meet both).
"""

import hashlib
import os
import sys
from pathlib import Path

# 1x1 RGB PNG (valid: signature, IHDR, zlib IDAT, IEND with correct CRCs).
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00"
    b"\x90wS\xde\x00\x00\x00\x0cIDATx\xdac\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xf7\x03AC"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)

# One empty 1x1-inch page; the xref offsets are exact.
PDF = b"""%PDF-1.4
1 0 obj
<< /Type /Catalog /Pages 2 0 R >>
endobj
2 0 obj
<< /Type /Pages /Kids [3 0 R] /Count 1 >>
endobj
3 0 obj
<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>
endobj
xref
0 4
0000000000 65535 f 
0000000009 00000 n 
0000000058 00000 n 
0000000115 00000 n 
trailer
<< /Size 4 /Root 1 0 R >>
startxref
184
%%EOF
"""

# 5000 lines of 63 bytes: 315000 bytes, over the 262144-byte text cap, so read needs
# view_range and edit refuses it; every line matches `lorem`, so grep truncates.
BIG_LOG = b"".join(b"%05d lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" % i for i in range(1, 5001))

FILES: dict[str, bytes] = {
    "README.md": b"# Fixture\n\nA small tree for the differential test of hands against the SDK.\n",
    # The contract's own example for read's view_range arithmetic.
    "hello.txt": b"hello\nworld\nfoo\nfoo\n",
    "notes.txt": b"first note\nsecond note: needle here\nthird note\n\nfifth note after a blank line\n",
    "edit_me.txt": b"alpha beta\nalpha gamma\nalpha delta\nunique line\nthe end\n",
    "empty.txt": b"",
    "big.log": BIG_LOG,
    "huge_line.txt": b"x" * 300_000 + b"\n",
    # NUL bytes and bytes that are not UTF-8: binary by every definition.
    "binary.bin": b"\x7fELF\x02\x01\x01\x00\x00\x00needle\x00\xff\xfe\x80\x81binary\n",
    "invalid_utf8.txt": b"valid first line\nbad bytes: \xff\xfe\xc3\x28 here\nneedle after them\n",
    "image.png": PNG,
    "doc.pdf": PDF,
    # read chooses image handling by extension alone (case-insensitive).
    "photo.JPG": b"this is text, not a JPEG\n",
    ".hidden": b"a dotfile\nneedle in a dotfile\n",
    # rg honours .gitignore only inside a git repository (this tree is none, so build/
    # is searched) but .ignore everywhere (so ignored.txt is not).
    ".gitignore": b"build/\n",
    ".ignore": b"ignored.txt\n",
    "ignored.txt": b"needle in an ignored file\n",
    "build/out.txt": b"needle in build output\n",
    "src/main.py": b'import sys\n\n\ndef main():\n    print("needle in main")\n    return 0\n\n\nsys.exit(main())\n',
    "src/lib/util.py": b"def helper(x):\n    # needle in a comment\n    return x * 2\n",
    "src/lib/data.txt": b"one\ntwo\nthree\n",
    "docs/guide.txt": b"Guide\n=====\n\nStep 1: read.\nStep 2: needle.\nStep 3: done.\n",
    "docs/nested/deep/leaf.txt": b"a leaf, three levels down\n",
    "unicode/h\u00e9llo w\u00f6rld.txt": "na\u00efve caf\u00e9 \u2615\n\u65e5\u672c\u8a9e\u306e\u884c\n".encode(),
    "unicode/\u65e5\u672c.txt": "caf\u00e9 again\n".encode(),
}

SYMLINKS = {
    # Inside pointing inside, to a file in another directory (see the module doc on ties).
    "link_inside": "docs/guide.txt",
    # Inside pointing to a directory inside: glob's `**` does not descend it.
    "link_dir": "docs/nested",
    # Inside pointing outside: every file tool must refuse it.
    "link_outside": "/etc/hostname",
    # Pointing nowhere: read says not found, write creates the target.
    "dangling": "does-not-exist.txt",
}

FIFO = "fifo"

# Base of the fixed mtimes: 2023-11-14T22:13:20Z, well in the past so that anything a
# test writes is newer than the whole fixture.
MTIME_BASE = 1_700_000_000


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        sys.exit(f"{root}: not empty")

    for rel, data in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for rel, target in SYMLINKS.items():
        os.symlink(target, root / rel)
    os.mkfifo(root / FIFO)

    # Final pass: distinct mtimes in the order of a hash of each relative path. os.walk
    # lists symlinked directories without descending them, so every entry comes once.
    entries = sorted(
        (os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files),
        key=lambda rel: hashlib.sha256(os.fsencode(rel)).digest(),
    )
    for i, rel in enumerate(entries):
        t = MTIME_BASE + 60 * (i + 1)
        # follow_symlinks=False: set the link's own time and never touch its target
        # (link_outside points at a host file).
        os.utime(root / rel, (t, t), follow_symlinks=False)
    # The root last and newest: `**` yields it too, so its place is fixed as well.
    t = MTIME_BASE + 60 * (len(entries) + 1)
    os.utime(root, (t, t))


if __name__ == "__main__":
    main()
