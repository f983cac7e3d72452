# abmll-tune's torchtune recipes. This file makes `recipes` this project's package, so
# that `PYTHONPATH=. tune run recipes/<name>` finds these recipes instead of the
# `recipes` package that torchtune's wheel installs (see docs/training.md, "Running recipes").
