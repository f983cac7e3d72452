"""abmll-tune: Amortized Bayesian Meta-Learning for LoRA (arXiv 2508.14285) on torchtune."""

import logging


class _DropTorchaoCppNotice(logging.Filter):
    """torchao 0.15 announces, at import, that it skips C++ extensions built for another
    torch; the project uses none of them, so that one line is noise to a user. Only that
    record is dropped (it reaches torchao's logger when abmll_tune is imported first, as
    in every ``python -m abmll_tune...`` command)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_DropTorchaoCppNotice())

__version__ = "0.1.0"
