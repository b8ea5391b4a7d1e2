#!/usr/bin/env python3
"""Runs every panel query of the chart's dashboards against a Prometheus and checks each returns
data: at least one finite sample over [start, end], as a Grafana panel over that time range
would show. Variables are substituted like Grafana does (`$namespace`, `$job`, All -> `.*`,
`$__rate_interval`, `$__range`).

usage: dashboard_queries.py PROM_URL START END NAMESPACE JOB DASHBOARD.json...
Prints one PASS/FAIL line per query; exits 1 when any fails.
"""
import json
import math
import sys
import urllib.parse
import urllib.request


def query_range(prom, expr, start, end):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "5"})
    with urllib.request.urlopen(f"{prom}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(body.get("error", body))
    return body["data"]["result"]


def main():
    prom, start, end, namespace, job = sys.argv[1:6]
    start, end = float(start), float(end)
    range_s = f"{max(60, int(end - start))}s"
    failures = 0
    for path in sys.argv[6:]:
        dashboard = json.load(open(path))
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                # The fleet dashboard's namespace variable is multi-value with All; the per-job one
                # names one namespace. Substitute the most specific names first.
                substituted = (
                    expr.replace("$__rate_interval", "20s")
                    .replace("$__range", range_s)
                    .replace("$namespace", namespace if "job" in variables else ".*")
                    .replace("$job", job)
                )
                label = f'{dashboard["uid"]} / {panel["title"]} [{target["refId"]}]'
                try:
                    series = query_range(prom, substituted, start, end)
                except Exception as error:  # the query itself is broken
                    print(f"FAIL dashboard query {label}: {error}\n     {substituted}")
                    failures += 1
                    continue
                finite = sum(
                    1 for s in series for _, v in s["values"] if math.isfinite(float(v))
                )
                if finite:
                    print(f"PASS dashboard query {label}: {len(series)} series, {finite} samples")
                else:
                    print(f"FAIL dashboard query {label}: no data\n     {substituted}")
                    failures += 1
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
