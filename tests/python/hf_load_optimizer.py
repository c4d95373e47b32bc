"""Load a checkpoint-N folder written by companion into transformers' Trainer
the way resume_from_checkpoint does (create_optimizer_and_scheduler, then
Trainer._load_optimizer_and_scheduler, which torch.loads optimizer.pt and
scheduler.pt with weights_only=True) and print what the optimizer and the
schedule hold, as JSON.

    python3 hf_load_optimizer.py CHECKPOINT LR WEIGHT_DECAY SCHEDULER WARMUP MAX_STEPS
"""
import json
import sys
import tempfile

import torch
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

ckpt, lr, wd, sched, warmup, max_steps = sys.argv[1:7]
model = GPT2LMHeadModel.from_pretrained(ckpt)
args = TrainingArguments(output_dir=tempfile.mkdtemp(), learning_rate=float(lr), weight_decay=float(wd),
                         lr_scheduler_type=sched, warmup_steps=float(warmup), max_steps=int(max_steps),
                         report_to=[], use_cpu=True)
trainer = Trainer(model=model, args=args)
trainer.create_optimizer_and_scheduler(num_training_steps=int(max_steps))
trainer._load_optimizer_and_scheduler(ckpt)
opt = trainer.optimizer
names = {id(p): n for n, p in model.named_parameters()}
out = {"groups": [], "state": {}, "last_lr": trainer.lr_scheduler.get_last_lr(),
       "last_epoch": trainer.lr_scheduler.last_epoch}
for g in opt.param_groups:
    out["groups"].append({"lr": g["lr"], "weight_decay": g["weight_decay"], "betas": list(g["betas"]),
                          "eps": g["eps"], "params": [names[id(p)] for p in g["params"]]})
    for p in g["params"]:
        st = opt.state[p]
        out["state"][names[id(p)]] = {"step": float(st["step"]), "exp_avg": st["exp_avg"].flatten().tolist(),
                                      "exp_avg_sq": st["exp_avg_sq"].flatten().tolist()}
print(json.dumps(out))
