"""
Train the tiny pipeline for 3 steps and save, per process, the first rollout (videos this process made, the group's
advantages) and the final adapter: `python tests/split_groups_run.py OUT [--split]`, under `torch.distributed.run`
for several processes (`tests/test_split_groups.py`).
"""

import sys

from helpers import tiny_trainer
from safetensors.torch import save_file

from trl_arcopo import ARCoPOTrainer


class RecordingTrainer(ARCoPOTrainer):
    """Keeps the first training group's decoded videos (this process's) and its advantages."""

    first = None

    def _finish_group(self, group, rewards, videos, mode, rollout_seconds, finite):
        group = super()._finish_group(group, rewards, videos, mode, rollout_seconds, finite)
        if self.first is None and mode == "train":
            self.first = {"videos": videos.clone(), "advantages": group.advantages.clone(), "rewards": group.rewards}
        return group


def main(output_dir: str, split: bool) -> None:
    trainer = tiny_trainer(
        output_dir, cls=RecordingTrainer, max_steps=3, num_generations=4, num_anchors=2, per_device_train_batch_size=2,
        split_groups_across_processes=split,
    )  # fmt: skip
    trainer.train()
    rank = trainer.accelerator.process_index
    tensors = {f"adapter.{k}": v.contiguous() for k, v in trainer.adapter_state_dict().items()}
    tensors.update({k: v.contiguous().cpu() for k, v in trainer.first.items()})
    save_file(tensors, f"{output_dir}/rank{rank}.safetensors")
    trainer.accelerator.end_training()  # the process group destroyed before exit: gloo's threads joined, not aborted


if __name__ == "__main__":
    main(sys.argv[1], "--split" in sys.argv)
