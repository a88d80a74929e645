"""Fine-tune a chat LLM on conversations (or preference pairs): full, LoRA or Q-LoRA.

    # LoRA on one GPU
    python finetune.py --model_name_or_path /models/Qwen2.5-7B-Instruct --data_path data.json \
        --output_dir out --use_lora True --bf16 True --num_train_epochs 3 --learning_rate 3e-4
    # Q-LoRA (4-bit NF4 base)
    python finetune.py ... --use_lora True --q_lora True --gradient_checkpointing True --optim paged_adamw_8bit
    # DPO with LoRA on preference pairs (--objective dpo|simpo|orpo|kto; sft is the default)
    python finetune.py ... --data_path pairs.jsonl --use_lora True --objective dpo --beta 0.1 --learning_rate 5e-6
    # full fine-tuning, settings from a file, one flag overridden
    python finetune.py config.yaml --learning_rate 1e-5
    # full fine-tuning sharded with FSDP over 8 GPUs (finetune/finetune_ds.sh --fsdp fsdp does the same)
    torchrun --nproc_per_node 8 finetune.py ... --fsdp True --fsdp_config ds_configs/fsdp.json

Every flag of transformers.TrainingArguments is accepted; `python finetune.py --help` lists them all. Launchers for
several GPUs and nodes are in finetune/.

Exit status: 0 when trained and saved (or, with --preflight_only True, when the memory estimate is printed and fits);
2 on a settings or data error, an estimate above the GPU's memory, an --output_dir another run holds
(llmft/run_folder.py) or a disk that filled up during a save (one message, no traceback); 75 when SIGTERM or
SIGUSR1 stopped the run after an optimizer step with a checkpoint (llmft/preemption.py): run it again with
`--resume_from_checkpoint auto` (or True) to continue; 128 + N when signal N came before training started (no
checkpoint). A signal during the final save waits for it to finish.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import TrainerCallback, set_seed

from llmft.config import parse_run
from llmft.compile_cache import use_compile_cache
from llmft.data.dataset import build_datasets
from llmft.data.packing import Packing
from llmft.data.preference_dataset import build_preference_datasets, preference_packing
from llmft.data.padding import PaddingCollator
from llmft.distributed import ranks_shut_down_when_done, require_launcher
from llmft.errors import exit_on_user_error
from llmft.model import build_model, load_training_tokenizer, lora_weights
from llmft.plan import apply_plan_to_training_args, log_plan
from llmft.preemption import exit_on_signal, signals_deferred
from llmft.preference_trainer import PreferenceTrainer
from llmft.preflight import preflight
from llmft.run_folder import (
    check_run_settings,
    disk_full_is_user_error,
    lock_run_output_dir,
    record_run_settings,
    release_held_locks,
    replace_previous_run,
    resume_checkpoint,
)
from llmft.saving import describe_run, save_for_inference
from llmft.trainer import LlmftTrainer


@exit_on_user_error
@exit_on_signal(before_exit=release_held_locks)  # before and after training, SIGTERM ends the run at once
def main(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> LlmftTrainer | None:
    """Train as the flags in argv (default: sys.argv) say; returns the Trainer (None with --preflight_only True).
    `callbacks` join the Trainer's."""
    # the settings, their plan (mode, sharding, optimizer, kernels) and every check of both
    model_args, data_args, lora_args, quant_args, training_args, preference_args, plan = parse_run(argv)
    use_compile_cache(training_args.output_dir)  # before anything compiles: kernels kept with the run, not the node
    require_launcher(training_args)  # --deepspeed in a process of its own would fail only once the model has loaded
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    with lock_run_output_dir(training_args):  # one run at a time in --output_dir; released however this ends
        set_seed(training_args.seed)
        run_settings = check_run_settings(  # resume auto: the same run's settings
            model_args, data_args, lora_args, quant_args, training_args, preference_args
        )
        resume_from = resume_checkpoint(training_args)  # before the model loads: a checkpoint refused costs no wait

        tokenizer, added_tokens = load_training_tokenizer(model_args, data_args)
        plan = plan.with_added_tokens(added_tokens)  # complete: whether the embeddings train
        log_plan(plan, training_args)
        # the memory preflight reads the vocabulary, not the weights or the data; it may stop the run here
        memory = preflight(model_args, data_args, lora_args, training_args, plan, tokenizer)
        if training_args.preflight_only:
            return None
        if plan.objective == "sft":
            train_dataset, eval_dataset = build_datasets(data_args, tokenizer, training_args)
        else:
            train_dataset, eval_dataset = build_preference_datasets(data_args, tokenizer, training_args, plan.objective)

        model = build_model(model_args, lora_args, training_args, tokenizer, plan)
        # PiSSA / OLoRA: the adapter as it starts, to convert the final save into one for the original base
        initial_adapter = lora_weights(model) if plan.uses_lora and lora_args.changes_base_weights else None
        if training_args.should_log and hasattr(model, "print_trainable_parameters"):
            model.print_trainable_parameters()

        # SFT: evaluation pads, training packs when --packing True (llmft/data/packing.py); preference: both pack
        apply_plan_to_training_args(plan, training_args)  # Liger and checkpointing as planned, read by the Trainer
        if plan.objective == "sft":
            trainer_class, objective = LlmftTrainer, {}
            collator, packing = PaddingCollator(tokenizer), Packing.from_args(data_args, tokenizer, plan.kernels)
        else:
            # a full fine-tune's reference: computed as training starts, kept in the run folder for a resume
            reference_plan = plan if plan.reference == "precomputed" else None
            trainer_class, objective = (
                PreferenceTrainer,
                {"preference": preference_args, "reference_plan": reference_plan},
            )
            collator, packing = preference_packing(data_args, plan.objective, plan.kernels)
        trainer = trainer_class(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            packing=packing,
            **objective,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
            offload_activations=plan.offload_activations,
            lean_recompute=plan.lean_recompute,
            memory_estimate=memory,
        )
        # only now, when nothing in the data or the model has stopped the run, does it write into --output_dir
        with disk_full_is_user_error(training_args.output_dir):
            if training_args.overwrite_output_dir:
                replace_previous_run(training_args)
            record_run_settings(run_settings, training_args)
            with ranks_shut_down_when_done(trainer):  # so that no rank aborts at exit after a finished or preempted run
                trainer.train(resume_from_checkpoint=resume_from)
                with signals_deferred("the final save"):  # a SIGTERM now waits until the result is in place, whole
                    run = describe_run(plan)
                    save_for_inference(trainer, tokenizer, training_args.output_dir, run, initial_adapter)
        return trainer


if __name__ == "__main__":
    main()
