#!/usr/bin/env python3
"""Every value in the chart's values.yaml has a comment line directly above it.

Keys inside Kubernetes pass-through objects (podSecurityContext, securityContext, resources)
are documented by Kubernetes itself and only need the comment above the object.
"""
import re
import sys

PASS_THROUGH = {"podSecurityContext", "securityContext", "resources"}

missing = []
lines = open(sys.argv[1]).read().splitlines()
stack = []  # (indent, key)
for number, line in enumerate(lines, 1):
    match = re.match(r"^(\s*)([A-Za-z0-9_.-]+):", line)
    if not match:
        continue
    indent, key = len(match.group(1)), match.group(2)
    while stack and stack[-1][0] >= indent:
        stack.pop()
    inside_pass_through = any(k in PASS_THROUGH for _, k in stack)
    stack.append((indent, key))
    if inside_pass_through:
        continue
    previous = lines[number - 2].strip() if number > 1 else ""
    value = line.split(":", 1)[1].strip()
    # A group of further values (not a pass-through object) needs no comment: its children do.
    is_group = value == "" and key not in PASS_THROUGH
    if not previous.startswith("#") and not is_group:
        missing.append(f"line {number}: {line.strip()}")
for entry in missing:
    print(f"no comment above {entry}")
sys.exit(1 if missing else 0)
