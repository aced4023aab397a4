"""Two real JAX processes on localhost: disjoint train shards, global batches, eval coverage."""
import json
import textwrap

import pytest

from tests.cli_helpers import run_two_processes

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    sys.path.insert(0, "tests")
    from test_data_pipeline import word_tokenizer
    from tenure.engine.data.config import DataConfig
    from tenure.engine.data.pipeline import build_eval_batches, build_label_vocab, build_train_iterator, to_global_batch

    cfg = DataConfig(train=f"{data_dir}/train.jsonl", validation=f"{data_dir}/val.jsonl", batch_size=8,
                     eval_batch_size=4, max_length=16, length_buckets=[4, 8, 16], shuffle=False, num_epochs=1,
                     read_threads=1)
    tok, vocab = word_tokenizer(), build_label_vocab(cfg, "seq_cls")
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    it = build_train_iterator(cfg, "seq_cls", tok, vocab, process_index=jax.process_index(), process_count=2)
    local_ids, global_ids, shapes, widths = [], [], [], []
    for batch in it:
        local_ids += (batch["input_ids"][:, 1] - 5).tolist()
        widths.append(batch["input_ids"].shape[1])
        arrays = to_global_batch(batch, mesh)
        shapes.append(list(arrays["input_ids"].shape))
        global_ids.append((multihost_utils.process_allgather(arrays["input_ids"], tiled=True)[:, 1] - 5).tolist())
    eval_ids = []
    for batch in build_eval_batches(cfg, "validation", "seq_cls", tok, vocab, process_index=jax.process_index(),
                                    process_count=2):
        arrays = to_global_batch(batch, mesh)
        ids = multihost_utils.process_allgather(arrays["input_ids"], tiled=True)[:, 1] - 5
        mask = multihost_utils.process_allgather(arrays["example_mask"], tiled=True)
        eval_ids += ids[mask > 0].tolist()
    print("RESULT " + json.dumps({"local": local_ids, "global": global_ids, "shapes": shapes, "widths": widths,
                                  "eval": eval_ids}))
    jax.distributed.shutdown()
""")


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_disjoint_shards_and_build_global_batches(tmp_path):
    # Odd records are 5 words long, even ones 1 word: alone, process 0 would pad to bucket 4 and
    # process 1 to bucket 8. With two processes both pad to the last bucket (16) with no exchange.
    _write(tmp_path / "train.jsonl", [{"text": " ".join([f"w{k}"] + ["w199"] * (4 * (k % 2))),
                                       "label": "pos" if k % 2 else "neg"} for k in range(16)])
    _write(tmp_path / "val.jsonl", [{"text": f"w{k}", "label": "neg"} for k in range(7)])
    r0, r1 = run_two_processes(WORKER, tmp_path, timeout=240)
    assert r0["local"] == [0, 2, 4, 6, 8, 10, 12, 14] and r1["local"] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert r0["widths"] == [16, 16] and r1["widths"] == [16, 16]
    assert r0["shapes"] == r1["shapes"] == [[8, 16], [8, 16]]
    assert r0["global"] == r1["global"] == [[0, 2, 4, 6, 1, 3, 5, 7], [8, 10, 12, 14, 9, 11, 13, 15]]
    # 7 eval examples, global batch 4: process 0 holds 0,2 | 4,6 and process 1 holds 1,3 | 5,(pad).
    assert r0["eval"] == r1["eval"] == [0, 2, 1, 3, 4, 6, 5]
