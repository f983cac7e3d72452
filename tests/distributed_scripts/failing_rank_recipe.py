"""The distributed recipe with one rank failing mid-epoch (tests/test_distributed.py):
rank 1 raises at its second task visit while rank 0 waits in the outer step's all-reduce."""

import sys

from abmll_tune.recipes.abmll_meta_distributed import MetaLearningRecipeDistributed
from abmll_tune.recipes.abmll_meta_single_device import run
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torchtune import config

from abmll_tune.meta import MetaLearner

_train_task = MetaLearner.train_task


def _failing_train_task(self, visit, **kwargs):
    import torch.distributed as dist

    if dist.get_rank() == 1 and visit.position >= 2:
        raise RuntimeError("injected failure on rank 1")
    return _train_task(self, visit, **kwargs)


@record
@config.parse
def recipe_main(cfg: DictConfig) -> None:
    MetaLearner.train_task = _failing_train_task
    run(cfg, recipe_class=MetaLearningRecipeDistributed)


if __name__ == "__main__":
    sys.exit(recipe_main())
