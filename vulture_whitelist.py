# Names vulture (the dead-code check in `make lint`) cannot see being used. Each one is used by
# something it does not read: a template, the database, a framework calling a method by name, a
# library reading an attribute, or the tests and benchmarks. Add a name here only with its reason.
# ruff skips this file (pyproject.toml): it is a list of names, not code.
from vulture.whitelist_utils import Whitelist

_ = Whitelist()

# Signal handlers and callbacks take arguments they do not use.
frame  # app/cli.py _exit_on_sigterm
scores  # worker/inference.py _Watch.__call__ (transformers StoppingCriteria)

# Attributes a library reads: the sqlite3 driver, zipfile, tokenizers, torch, transformers.
_.isolation_level  # app/db.py
_.compress_type  # app/services/exports.py
_.pre_tokenizer  # worker/demo.py
_.decoder  # worker/demo.py
_.post_processor  # worker/demo.py
_.pad_token  # worker/training/loading.py
_.use_cache  # worker/training/loading.py
_.optimizer  # worker/training/recipe.py
_.should_save  # worker/training/trainer.py (TrainerControl)
_.should_training_stop  # worker/training/trainer.py (TrainerControl)

# Methods a framework calls by name: http.server and transformers' TrainerCallback.
daemon_threads  # worker/inference.py
server_version  # worker/inference.py
_.log_message  # worker/inference.py
_.close_connection  # worker/inference.py
_.do_GET  # worker/inference.py
_.do_POST  # worker/inference.py
_.on_step_begin  # worker/training/trainer.py
_.on_step_end  # worker/training/trainer.py
_.on_evaluate  # worker/training/trainer.py
_.on_log  # worker/training/trainer.py
_.on_save  # worker/training/trainer.py

# Enum members and pydantic fields chosen by value (from a form, the API, a stored config).
ipo  # app/train_config.py DpoLoss
chatml  # app/train_config.py ChatTemplate
on  # app/train_config.py GradientCheckpointing
off
offload
tiled
linear  # app/train_config.py LrScheduler
constant
constant_with_warmup
beta  # app/train_config.py TrainConfig (read by the coming DPO/ORPO recipes)
loss_type

# Table columns (app/models.py), written through queue.update_progress(**fields) and read by
# templates, the JSON API and SQL.
context_length
original_filename
memory_policy_reason
download_done_bytes
download_total_bytes
vram_before_mib
vram_after_mib
resume_from_scratch
_.resume_from_scratch
grad_norm
tokens_per_second
vram_allocated_mib
vram_reserved_mib
device_used_mib
device_total_mib
elapsed_seconds
gpu_name
vram_total_mib
vram_used_mib
gpu_utilization
gpu_temperature
finish_reason
completion_tokens
first_token_ms
stage
progress_done
ingest_error  # app/models.py HubImport (written by an UPDATE's values, read by the template)
ingest_hint

# Dataclass fields that templates read (app/services/job_views.py, app/services/jobs.py FormField).
duration_seconds
final_loss
final_eval_loss
tokens_trained
tokens_trained_again
rubric_is_default  # app/services/judge_check.py JudgeSetup (templates/system/_judge.html)
event_files  # TensorBoardLogs, templates/jobs/detail.html
help
advanced
drawn_rows  # app/services/job_views.py MixRow (templates/jobs/detail.html's Datasets card)
drawn_tokens
eval_tokens

# The data dir's layout names every file in it, used or not yet (the datasets package will).
_.original_file  # app/layout.py
_.split_file  # app/layout.py

# Used by the tests and the benchmarks, which the check does not read.
_.trained_tokens  # worker/data.py TokenizedExample
unfuse_mlps  # worker/fused_mlp.py
ListSink  # worker/metrics.py
resumed_from_step  # worker/training/trainer.py TrainResult

# The metric field list: being reworked on the metrics-streaming branch.
METRIC_KEYS  # worker/metrics.py
TIMING_KEYS  # worker/metrics.py

# Preference metric columns: written and read by name (metric_columns(), the charts' specs).
rewards_chosen  # app/models.py Metric
rewards_rejected  # app/models.py Metric
reward_accuracy  # app/models.py Metric
eval_rewards_chosen  # app/models.py Metric
eval_rewards_rejected  # app/models.py Metric
eval_reward_margin  # app/models.py Metric
eval_reward_accuracy  # app/models.py Metric

# Chart series fields and their spec: rendered into the job page's data-series (templates).
color  # app/services/job_views.py
points  # app/services/job_views.py
smooth  # app/services/job_views.py
dash  # app/services/job_views.py
_.spec  # app/services/job_views.py

# Recipes looked up by name (worker/recipes/__init__.py RECIPES) and what the Trainer reads.
DPORecipe  # worker/recipes/dpo.py
ORPORecipe  # worker/recipes/orpo.py
_.model_accepts_loss_kwargs  # worker/recipes/preference.py (transformers Trainer)

# A recipe's memory-policy steps one at a time: the tests and bench/profile_step.py call them.
_._measure_memory_policy  # worker/training/recipe.py
_._try_policy  # worker/training/recipe.py
_._decoder_layers  # worker/training/recipe.py

# A path the layout owns that app/dataset_store.py still builds from its own constant.
_.normalized_rows  # app/layout.py

# A field of llama-cpp-python's ctypes quantize params, read by llama.cpp (worker/export.py).
_.nthread  # worker/export.py
# Runs queued exports in the calling process: tests and `python -c` by hand (like run_pending_merges).
run_pending_exports  # worker/export.py
# The start timing's figures as numbers: bench/train.py reports them (the job page takes `summary`).
_.as_dict  # worker/training/start_timing.py
# Read by templates (models/list.html) and pydantic fields that travel in model_dump (tool calling).
_.has_chat_template  # app/models.py, templates/models/list.html
_.tool_call_id  # app/generation.py, app/web/routes/openai_api.py: the chat template reads it
# CUDA graphs of the decoder layers (worker/layer_graphs.py): a layer's class is swapped for one
# whose __call__ asks its graphs first; the tests and bench/profile_step.py read the graphs and
# their replay count.
_.__class__  # worker/layer_graphs.py
graphs_of  # worker/layer_graphs.py
_.replays  # worker/layer_graphs.py
# torch calls it when a module is printed (HostEmbedding says where its table is).
_.extra_repr  # worker/host_embeddings.py
