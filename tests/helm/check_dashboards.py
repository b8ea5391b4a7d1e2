#!/usr/bin/env python3
"""The Grafana dashboards: valid JSON, unique stable uids, a $datasource variable used by every
panel and query, the namespace (and, per job, job) variables, and non-empty queries."""
import json
import sys

problems = []
uids = set()
for path in sys.argv[1:]:
    d = json.load(open(path))
    uid = d.get("uid", "")
    if not uid or uid in uids or len(uid) > 40:
        problems.append(f"{path}: uid {uid!r} missing, duplicated or too long")
    uids.add(uid)
    names = [v["name"] for v in d["templating"]["list"]]
    for required in ["datasource", "namespace"] + (["job"] if "job" in path.split("/")[-1] else []):
        if required not in names:
            problems.append(f"{path}: no ${required} variable")
    ids = [p["id"] for p in d["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(f"{path}: duplicate panel ids")
    for panel in d["panels"]:
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{path}: panel {panel['title']!r} does not use $datasource")
        for target in panel.get("targets", []):
            if not target.get("expr") or target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{path}: panel {panel['title']!r} has an empty or fixed-datasource query")
    print(f"{path}: uid {uid}, {len(d['panels'])} panels, variables {names}")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
