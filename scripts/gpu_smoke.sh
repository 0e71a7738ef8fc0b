#!/usr/bin/env bash
# The real GPU recipes, a few steps each, on a tiny model: what CPU CI cannot run.
#
#   bash scripts/gpu_smoke.sh DATA OUT        # one GPU, about two minutes
#
# DATA is a practice set of scripts/make_demo_data.py (train.csv, test.csv and the test pair CSVs are
# used; the test split doubles as the validation set). For each recipe below it runs
# `accelerate launch recipes/finetune.py recipes/configs/<recipe>.yaml` as the README does (bf16,
# gradient checkpointing, DeepSpeed ZeRO-2 for LoRA, ZeRO-3 for full fine-tuning) with the tiny
# Qwen2.5-VL of scripts/make_tiny_models.py in place of the 3B model and 6 optimizer steps, then
# scores the test split with `python -m qalign_kvq.infer` on the GPU and evaluates it. Logs, predictions
# and metrics go to OUT; the last line says which recipes passed. Exit status: the number that failed.
set -u
data=${1:?usage: gpu_smoke.sh DATA OUT}
out=${2:?usage: gpu_smoke.sh DATA OUT}
py=${PYTHON:-python3}
recipes=${RECIPES:-kvq_qwen2_5_vl_3b_lora kvq_qwen2_5_vl_3b_full}
mkdir -p "$out"
$py scripts/make_tiny_models.py --out "$out/models" --family qwen2_5_vl > "$out/models.log" 2>&1 \
  || { echo "could not build the tiny model: see $out/models.log"; exit 99; }
passed=() failed=()
for recipe in $recipes; do
  run="$out/$recipe"
  echo "=== $recipe"
  start=$SECONDS
  if $py -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
       --dynamo_backend no recipes/finetune.py "recipes/configs/$recipe.yaml" \
       --model_name_or_path "$out/models/qwen2_5_vl" --train_csv "$data/train.csv" --video_root "$data" \
       --val_csv "$data/test.csv" --val_pairs_homologous "$data/test_pairs_homologous.csv" \
       --val_pairs_nonhomologous "$data/test_pairs_nonhomologous.csv" --output_dir "$run" \
       --max_steps 6 --eval_steps 3 --save_steps 3 --logging_steps 1 --report_to none \
       --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --dataloader_num_workers 2 \
       > "$run.train.log" 2>&1 \
     && $py -m qalign_kvq.infer --model "$run" --videos "$data/test.csv" --root "$data" \
       --output "$run.pred.csv" --no-progress > "$run.infer.log" 2>&1 \
     && $py -m qalign_kvq.evaluate --pred "$run.pred.csv" --truth "$data/test.csv" \
       --pairs-homologous "$data/test_pairs_homologous.csv" \
       --pairs-nonhomologous "$data/test_pairs_nonhomologous.csv" --json "$run.metrics.json" \
       > "$run.evaluate.log" 2>&1; then
    passed+=("$recipe")
    echo "passed in $((SECONDS - start)) s: $(grep -o "'loss': '[^']*'" "$run.train.log" | head -3 | tr '\n' ' ')"
    grep -h "distributed:\|trainable" "$run.train.log" | head -2
    cat "$run.metrics.json"; echo
  else
    failed+=("$recipe")
    echo "FAILED after $((SECONDS - start)) s; the end of its logs:"
    tail -n 25 "$run".*.log
  fi
done
echo "passed: ${passed[*]:-none}; failed: ${failed[*]:-none}"
exit "${#failed[@]}"
