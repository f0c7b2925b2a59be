"""``verify`` against a bare read of the same objects, measured side by side in one run.

Fills a topic and backs it up (zstd, small segments so each partition has several), then
alternates, ``repeats`` times:

* ``bare``: one process reading every object of the backup (checkpoints, index chunks, segments)
  with the same number of calls at once as ours (8 on files, 32 on S3) and taking each one's
  SHA-256: what any verify has to do at least, with nothing decoded;
* ``ours``: ``python -m kafka_backup.cli.main verify`` (every segment fetched, digest checked,
  decompressed and decoded, offsets proved; segments fetched ahead the storage's concurrency at a time);
* ``ours-1``: the same with ``--verify-storage-concurrency 1`` (one segment fetched ahead: how
  verify read before it fetched across partitions).

Whole processes are timed; the same commands on an empty backup give start-up, subtracted in the
second lines ("records" is the backup's).

    python bench/verify.py [records] [partitions] [repeats] [file|s3|s3:<ms>]

``s3:30`` holds every request 30 ms on its way (bench/backup.py's proxy): the round trip that
reading one segment after the other waits for each time.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.backup import backups  # noqa: E402
from bench.common import compare, int_args, ours, timed  # noqa: E402

BARE = r'''
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
store, endpoint, bid = sys.argv[1], sys.argv[2], sys.argv[3]
if store.startswith("s3://"):
    import boto3
    from botocore.config import Config
    bucket, _, prefix = store[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint or None, config=Config(max_pool_connections=36))
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}{bid}/")
            for o in page.get("Contents", [])]
    read = lambda key: s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    at_once = 32
else:
    root = os.path.join(store[len("file://"):], bid)
    keys = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    def read(path):
        with open(path, "rb") as fh:
            return fh.read()
    at_once = 8
with ThreadPoolExecutor(at_once) as pool:
    digests = list(pool.map(lambda key: hashlib.sha256(read(key)).digest(), keys))
assert len(digests) == len(keys)
'''


def main() -> None:
    records, partitions, repeats = int_args(sys.argv[1:], 200_000, 16, 3)
    storage = sys.argv[4] if len(sys.argv) > 4 else "file"
    with backups("verify", records, partitions, storage, "--backup-segment-max-records", "5000") as (
            work, bootstrap, where, sources):
        url, endpoint = where[1], where[3] if len(where) > 2 else ""  # --storage URL [--s3-endpoint-url URL]
        bids = {name: bid for name, (_topic, bid, _n) in sources.items()}
        bare_py = os.path.join(work, "bare.py")
        with open(bare_py, "w") as fh:
            fh.write(BARE)
        names = ("bare", "ours", "ours-1")
        runs: dict[str, list[dict[str, float]]] = {k + s: [] for k in names for s in ("", "-empty")}
        for r in range(repeats):  # interleaved: a noisy neighbour hits each
            for name, suffix in (("full", ""), ("empty", "-empty")):
                bid = bids[name]
                runs["bare" + suffix].append(timed([sys.executable, bare_py, url, endpoint, bid],
                                                   os.path.join(work, f"bare{suffix}-{r}.log")))
                for mine, extra in (("ours", []), ("ours-1", ["--verify-storage-concurrency", "1"])):
                    runs[mine + suffix].append(timed(
                        ours("verify", "--bootstrap-servers", bootstrap, "--backup-id", bid, *where, *extra),
                        os.path.join(work, f"{mine}{suffix}-{r}.log")))
        print(f"verify of {records} records on {partitions} partitions (segments of 5,000 records), "
              f"{repeats} runs each, whole process (start-up included); stored in {storage}")
        for mine in ("ours", "ours-1"):
            print(f"{mine}:")
            compare({"bare": runs["bare"], "bare-empty": runs["bare-empty"], "ours": runs[mine],
                     "ours-empty": runs[mine + "-empty"]}, records)


if __name__ == "__main__":
    main()
