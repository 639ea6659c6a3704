"""Real models first tried as held-out models, kept as cases after psgrad was found wrong or refusing on them (the
capture fixes of NOTE [outputs that are views, modified in place] and NOTE [outputs the module itself consumes] in
psgrad.capture.record, and the embedding rule's non-contiguous indices). Same format as tests/real_models.py."""

from __future__ import annotations

import torch
from real_models import (
    AUDIO,
    ENC,
    VIT,
    B,
    Case,
    _hf,
    _pixels,
    _tf,
    audio_batch,
    class_ce,
    classify_batch,
    registrar,
    seeded,
    seq2seq_batch,
    token_ce,
)

CASES: list[Case] = []
case = registrar(CASES)


@case("hf-longformer", "transformers")
@seeded
def hf_longformer():  # q = self.query_global(h); q /= sqrt(d): an in-place op on a Linear's view output
    tf = _tf()
    cfg = tf.LongformerConfig(**{**ENC, "max_position_embeddings": 32}, attention_window=4, pad_token_id=1)
    return _hf(tf.LongformerForSequenceClassification, cfg, classify_batch(pad_id=1), class_ce)


@case("hf-longt5-tglobal", "transformers")
@seeded
def hf_longt5():  # eager attention returns its weights, which it also uses: the relative bias was counted twice
    tf = _tf()
    cfg = tf.LongT5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                          encoder_attention_type="transient-global", local_radius=2, global_block_size=2,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    inputs, labels = seq2seq_batch(start_id=0, pad_id=0)
    return _hf(tf.LongT5ForConditionalGeneration, cfg, ({**inputs, "use_cache": False}, labels), token_ce)


@case("hf-deberta-v2", "transformers")
@seeded
def hf_deberta_v2():  # the encoder returns its last hidden state twice, and uses its layers' outputs it returns
    tf = _tf()
    cfg = tf.DebertaV2Config(**ENC, relative_attention=True, position_buckets=4, max_relative_positions=8,
                             pos_att_type=["p2c", "c2p"], pooler_dropout=0.0, pad_token_id=0, norm_rel_ebd="layer_norm",
                             share_att_key=True)
    return _hf(tf.DebertaV2ForSequenceClassification, cfg, classify_batch(), class_ce)


@case("hf-wavlm", "transformers")
@seeded
def hf_wavlm():  # gated relative position bias returned by the attention, which also uses it
    tf = _tf()
    return _hf(tf.WavLMForSequenceClassification, tf.WavLMConfig(**AUDIO, num_buckets=8, max_bucket_distance=16),
               audio_batch(), class_ce)


@case("hf-xlnet", "transformers")
@seeded
def hf_xlnet():  # ids transposed and made contiguous: time-first indices, non-contiguous once batch first
    tf = _tf()
    cfg = tf.XLNetConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, d_inner=32, dropout=0.0, num_labels=3,
                         summary_last_dropout=0.0, pad_token_id=5)
    inputs, y = classify_batch(pad_id=5)
    inputs["token_type_ids"] = (torch.arange(inputs["input_ids"].shape[1]) >= 3).long().expand(B, -1).clone()
    return _hf(tf.XLNetForSequenceClassification, cfg, ({**inputs, "use_mems": False}, y), class_ce)


@case("timm-xcit", "timm")
@seeded
def timm_xcit():  # PositionalEncodingFourier(B, H, W): ints in, pos.repeat(B, ...) out; BatchNorm in the patch embed
    from real_models_vision import _timm

    return _timm("xcit_nano_12_p16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                 cls_attn_layers=1, eta=0.5)


@case("hf-beit", "transformers")
@seeded
def hf_beit():  # each layer's relative position bias module: called with no input of any example
    tf = _tf()
    cfg = tf.BeitConfig(**VIT, use_relative_position_bias=True, layer_scale_init_value=0.5, use_mean_pooling=True,
                        drop_path_rate=0.0)
    return _hf(tf.BeitForImageClassification, cfg, _pixels(), class_ce)


@case("hf-data2vec-vision", "transformers")
@seeded
def hf_data2vec_vision():  # one relative position bias, made from no input, broadcast to every layer
    tf = _tf()
    cfg = tf.Data2VecVisionConfig(**VIT, use_shared_relative_position_bias=True, layer_scale_init_value=0.5,
                                  use_mean_pooling=True, drop_path_rate=0.0)
    return _hf(tf.Data2VecVisionForImageClassification, cfg, _pixels(), class_ce)


@case("timm-sequencer2d", "timm")
@seeded
def timm_sequencer():  # bidirectional nn.LSTM over rows and columns of merged rows: torch.func cannot run it
    from real_models_vision import _timm

    return _timm("sequencer2d_s", layers=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), hidden_sizes=(8, 8, 8, 8),
                 patch_sizes=(4, 2, 1, 1))


@case("peft-loha-llama", "transformers", "peft")
@seeded
def peft_loha():  # LoHa's weights come from an autograd Function torch.func cannot transform
    from peft import LoHaConfig, get_peft_model
    from real_models import hf_llama

    model, loss, inputs, y = hf_llama()
    cfg = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(model, cfg).eval(), loss, inputs, y


def _virtual_tokens_dropped(out, y, n=3):
    return token_ce(out.logits[:, n:], y)


@case("peft-prompt-tuning-gpt2", "transformers", "peft")
@seeded
def peft_prompt_tuning():  # virtual token embeddings prepended in the root's forward (.item() on the way)
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from real_models import hf_gpt2

    model, _, inputs, y = hf_gpt2()
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    return get_peft_model(model, cfg).eval(), _virtual_tokens_dropped, inputs, y
