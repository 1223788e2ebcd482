"""One rank of a distributed training run, for tests/test_distributed_train.py.

Run as a script with torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT): ``python _ddp_child.py STORE TRAIN_CSV VALID_CSV OUT OVERRIDES_JSON
[--resume] [--interrupt-after N]``. ``--interrupt-after N`` raises KeyboardInterrupt on
every rank after epoch N has been saved (what Ctrl-C does to a torchrun job); the process
then exits with status 130.
"""

from __future__ import annotations

import json
import sys

import torch

from taemi.config import build_config, parse_overrides
from taemi.data.labels import read_labels
from taemi.train.trainer import train


def main(argv: list[str]) -> int:
    store, train_csv, valid_csv, out, overrides = argv[:5]
    resume = "--resume" in argv
    stop = int(argv[argv.index("--interrupt-after") + 1]) if "--interrupt-after" in argv else None
    torch.set_num_threads(1)
    cfg = build_config("paper", parse_overrides(json.loads(overrides)))

    def interrupt(epoch: int, row: dict) -> None:
        if stop is not None and epoch >= stop:
            raise KeyboardInterrupt

    try:
        train(
            cfg,
            store,
            read_labels(train_csv),
            read_labels(valid_csv),
            out,
            resume=resume,
            progress=False,
            callbacks=[interrupt],
        )
    except KeyboardInterrupt:
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
