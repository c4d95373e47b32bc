"""transformers' Trainer on the rows a Rust test trains on, with the same
arguments (sequential batches: the test's own loader does not shuffle), to
check that checkpoints move between the two trainers mid-run.

    python3 hf_resume.py resume CHECKPOINT ROWS_JSON ARGS_JSON
        continue the run from a checkpoint-N folder (written by companion) to
        max_steps; print the losses of the steps it took
    python3 hf_resume.py train MODEL_DIR ROWS_JSON ARGS_JSON OUT_DIR STOP_AT
        train from MODEL_DIR to max_steps; print every step's loss; then
        train again from MODEL_DIR, saving checkpoints into OUT_DIR, and stop
        at step STOP_AT (the interrupted run a companion test resumes)

ARGS_JSON: TrainingArguments fields (learning_rate, weight_decay, ...); with
a "deepspeed" field (a ds_config dict) the run is DeepSpeed's, one rank on
the CPU.
Prints one JSON object, {"losses": {step: [loss, grad_norm]}}.
"""
import json
import os
import sys
import tempfile

import torch
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def deepspeed_env():
    """One process as rank 0 of 1, on the CPU, for DeepSpeed's engine."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"DS_ACCELERATOR": "cpu", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def trainer(model_dir, rows, fields, out, callbacks=()):
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True, optim="adamw_torch",
                             train_sampling_strategy="sequential", logging_steps=1,
                             disable_tqdm=True, **fields)
    return Trainer(model=model, args=args, train_dataset=Rows(rows), callbacks=list(callbacks))


def losses(t):
    return {e["step"]: [e["loss"], e["grad_norm"]] for e in t.state.log_history if "loss" in e}


mode = sys.argv[1]
rows = json.loads(sys.argv[3])
fields = json.loads(sys.argv[4])
if "deepspeed" in fields:
    deepspeed_env()
if mode == "resume":
    ckpt = sys.argv[2]
    t = trainer(ckpt, rows, {**fields, "save_strategy": "no"}, tempfile.mkdtemp())
    t.train(resume_from_checkpoint=ckpt)
    print(json.dumps({"losses": losses(t)}))
elif mode == "train":
    model_dir, out, stop_at = sys.argv[2], sys.argv[5], int(sys.argv[6])
    t = trainer(model_dir, rows, {**fields, "save_strategy": "no"}, tempfile.mkdtemp())
    t.train()
    straight = losses(t)
    t = trainer(model_dir, rows, {**fields, "save_strategy": "steps", "save_steps": stop_at}, out,
                [StopAt(stop_at)])
    t.train()
    print(json.dumps({"losses": straight}))
else:
    sys.exit(f"unknown mode {mode}")
