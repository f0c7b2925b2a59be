"""Plan and rehearse a recovery: `list`, `describe`, `verify`'s verdict, and `restore --dry-run`.

Ground truth: what the test produced (records, key+value bytes, timestamps per partition), the
target cluster's topics and offsets before and after a dry run, and the real restore's result.
"""

from __future__ import annotations

import json
import os

import boto3
import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from tests.conftest import backup, cli, create_topic, produce, unique, watermarks

pytestmark = pytest.mark.e2e


def topics_of(broker: str) -> dict[str, int]:
    md = AdminClient({"bootstrap.servers": broker}).list_topics(timeout=15)
    return {name: len(t.partitions) for name, t in md.topics.items()}


def as_json(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_list_and_describe_show_exactly_what_was_backed_up_on_files_and_s3(broker, tmp_path, s3_endpoint):
    topic, bid = unique("inv"), unique("bk-inv")
    create_topic(broker, topic, 3)
    truth = produce(broker, topic, 3, 600)
    store = f"file://{tmp_path / 'store'}"
    backup(broker, topic, bid, store, "--backup-segment-max-records", "70")

    listed = as_json(cli("list", "--storage", store, "--format", "json"))
    assert listed["version"] == 1
    (b,) = listed["backups"]
    assert (b["backup_id"], b["topics"], b["partitions"]) == (bid, [topic], 3)
    assert (b["records"], b["bytes"]) == (600, truth.total_bytes)
    assert b["oldest_record_ts"] == truth.base_ts and b["newest_record_ts"] == truth.base_ts + 599
    assert b["last_run"]["status"] == "success" and b["last_run"]["mode"] == "one-shot"
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "store" / bid)
                 for f in fs if f.endswith((".zst", ".lz4", ".gz", ".sz", ".seg")))
    assert b["stored_bytes"] == stored

    described = as_json(cli("describe", "--storage", store, "--backup-id", bid, "--format", "json"))
    assert described["summary"] == b and described["last_verification"] is None
    for p in described["partitions"]:
        n = truth.records[p["partition"]]
        assert (p["records"], p["bytes"]) == (n, truth.bytes[p["partition"]])
        assert p["ranges"] == [[0, n]] and p["gaps"] == [] and p["next_offset"] == n
        assert p["segments"] == -(-n // 70) and p["compression"] == ["zstd"]
        # records are spread round-robin: partition k holds i = k, k + 3, ...
        assert p["oldest_record_ts"] == truth.base_ts + p["partition"]
        assert p["newest_record_ts"] == truth.base_ts + p["partition"] + 3 * (n - 1)

    r = cli("verify", "--backup-id", bid, "--storage", store)
    assert r.returncode == 0, r.stderr
    verdict = as_json(cli("describe", "--storage", store, "--backup-id", bid, "--format", "json"))
    v = verdict["last_verification"]
    assert (v["segments"], v["bad"], v["gaps"]) == (sum(p["segments"] for p in described["partitions"]), 0, 0)
    table = cli("describe", "--storage", store, "--backup-id", bid)
    assert table.returncode == 0 and "last verification:" in table.stdout and topic in table.stdout
    assert cli("describe", "--storage", store, "--backup-id", "nope").returncode == 2

    # the same on S3, next to a second backup
    bucket = unique("inv-bucket")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/backups"
    backup(broker, topic, bid, url, "--s3-endpoint-url", s3_endpoint)
    backup(broker, topic, bid + "-2", url, "--s3-endpoint-url", s3_endpoint, "--compression", "lz4")
    on_s3 = as_json(cli("list", "--storage", url, "--s3-endpoint-url", s3_endpoint, "--format", "json"))
    assert [x["backup_id"] for x in on_s3["backups"]] == [bid, bid + "-2"]
    assert all(x["records"] == 600 and x["bytes"] == truth.total_bytes for x in on_s3["backups"])
    d2 = as_json(cli("describe", "--storage", url, "--s3-endpoint-url", s3_endpoint, "--backup-id", bid + "-2",
                     "--format", "json"))
    assert {tuple(p["compression"]) for p in d2["partitions"]} == {("lz4",)}


def test_a_dry_run_writes_nothing_and_counts_what_the_restore_then_restores(broker, tmp_path):
    topic, bid = unique("dry"), unique("bk-dry")
    create_topic(broker, topic, 2)
    truth = produce(broker, topic, 2, 500)
    store = tmp_path / "store"
    backup(broker, topic, bid, f"file://{store}", "--backup-segment-max-records", "60")
    target = f"{topic}-restored"
    args = ["--bootstrap-servers", broker, "--backup-id", bid, "--storage", f"file://{store}",
            "--topic-map", f"{topic}:{target}"]

    before = topics_of(broker)
    r = cli("restore", *args, "--restore-id", "dry-1", "--dry-run")
    assert r.returncode == 0, r.stderr
    rows = {int(line.split()[1]): (int(line.split()[3].replace(",", "")), int(line.split()[4].replace(",", "")))
            for line in r.stdout.splitlines() if line.startswith(topic + " ")}
    assert rows == {p: (truth.records[p], truth.bytes[p]) for p in (0, 1)}
    assert f"target {target}: would be created with 2 partitions" in r.stdout
    assert "the restore would start" in r.stdout and "estimated duration: unknown" in r.stdout
    assert topics_of(broker) == before  # nothing created
    assert not (store / bid / "restores").exists()  # no checkpoint

    real = cli("restore", *args, "--restore-id", "real-1")
    assert real.returncode == 0, real.stderr
    assert watermarks(broker, target, 2) == {p: truth.records[p] for p in (0, 1)}

    # a time window: exactly the records the real restore then restores
    window = ["--from-time", str(truth.base_ts + 100), "--to-time", str(truth.base_ts + 400)]
    win_args = ["--bootstrap-servers", broker, "--backup-id", bid, "--storage", f"file://{store}",
                "--topic-map", f"{topic}:{target}-w", *window]
    r = cli("restore", *win_args, "--restore-id", "dry-w", "--dry-run", "--rate-limit", "100")
    assert r.returncode == 0, r.stderr
    total = next(line for line in r.stdout.splitlines() if line.startswith("total"))
    assert int(total.split()[1].replace(",", "")) == 300
    assert "about 3 s at the rate limit of 100/s" in r.stdout
    real = cli("restore", *win_args, "--restore-id", "real-w")
    assert real.returncode == 0, real.stderr
    assert sum(watermarks(broker, f"{target}-w", 2).values()) == 300

    # a target whose retention would delete records in scope: refused, and the target untouched
    short = f"{topic}-short"
    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(short, 2, 1, config={"retention.ms": "60000"})])[short].result(15)
    marks = watermarks(broker, short, 2)
    r = cli("restore", "--bootstrap-servers", broker, "--backup-id", bid, "--storage", f"file://{store}",
            "--topic-map", f"{topic}:{short}", "--restore-id", "dry-short", "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "WOULD REFUSE: restore.allow_retention_loss" in r.stdout and "500 of 500 records" in r.stdout
    assert watermarks(broker, short, 2) == marks
    # a later estimate comes from the real restore measured above
    r = cli("restore", *args, "--restore-id", "dry-2", "--topic-map", f"{topic}:{target}-again", "--dry-run")
    assert r.returncode == 0 and "measured by an earlier restore of this backup" in r.stdout, r.stdout
