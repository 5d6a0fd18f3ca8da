"""One trainer step under accelerate (run by tests/test_train_dist.py with 2 gloo processes).

Every process samples the same trees (same seed), keeps its share, and takes one SGD step with
lr 1, so new - old weights = -(averaged gradient). The main process saves the new weights.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from trainers.text.trainer import TreeTrainer


def main(out_path: str) -> None:
    from test_train_dist import make_trainer_parts, make_trees

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    model, tok, loss_cfg = make_trainer_parts()
    trees = make_trees(model, tok)
    share = trees[acc.process_index :: acc.num_processes]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)
    trainer = TreeTrainer(model, opt, loss_cfg, micro_batch_trees=1, grad_clip=0.0, accelerator=acc)
    trainer.step(share)
    if acc.is_main_process:
        torch.save(acc.unwrap_model(model).state_dict(), out_path)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
