"""Real models from transformers, timm, torchvision and peft, built tiny from configs with random weights.

Each case is data: an id, the library it needs, and a factory returning ``(model, loss_fn, inputs, targets)``
with the model in eval mode (dropout probabilities 0 where the config has them). Nothing is downloaded.
Used by tests/test_real_models.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

B, T, V = 3, 7, 64  # batch, sequence length, vocabulary
IMG, CLASSES = 32, 5


@dataclass(frozen=True)
class Case:
    id: str
    needs: tuple[str, ...]  # importable libraries the factory uses
    build: Callable[[], tuple]
    # parts run in float32 even in the float64 copy (e.g. an RMSNorm that calls .float()): the truth is exact
    # to float32 rounding there, far within the float32 tolerance, but not to float64's
    float32_inside: bool = False


def registrar(cases: list[Case]):
    """A decorator ``@case(id, *needs)`` that appends the factory below it to ``cases``."""

    def case(id: str, *needs: str, float32_inside: bool = False):
        def register(fn):
            cases.append(Case(id, needs, fn, float32_inside))
            return fn

        return register

    return case


CASES: list[Case] = []  # transformers and peft; tests/real_models_vision.py holds timm and torchvision
case = registrar(CASES)


# ----------------------------------------------------------------------------------------------- losses
def logits(out):
    return out.logits if hasattr(out, "logits") else out


def token_ce(out, y):
    """Mean cross-entropy over each example's tokens (label -100 ignored): shape [B]."""
    lg = logits(out)
    ce = F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none", ignore_index=-100).view(y.shape)
    keep = (y != -100).to(ce.dtype)
    return (ce * keep).sum(1) / keep.sum(1)


def class_ce(out, y):
    return F.cross_entropy(logits(out), y, reduction="none")


# ----------------------------------------------------------------------------------------------- data
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def tokens(seed=0, b=B, t=T, vocab=V, low=3):
    return torch.randint(low, vocab, (b, t), generator=_gen(seed))


def right_padding(b=B, t=T):
    """Attention mask [b, t]: row 0 full, the others padded on the right by 2 and 3 positions."""
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        mask[i, t - 1 - i :] = 0
    return mask


def lm_batch(pad_id=0, seed=0):
    """Causal-LM inputs with padded rows, and next-token labels (-100 on padding and the last position)."""
    ids, mask = tokens(seed), right_padding()
    ids = ids.masked_fill(mask == 0, pad_id)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :-1][mask[:, 1:] == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def images(seed=0, b=B, size=IMG, channels=3):
    g = _gen(seed)
    return torch.randn(b, channels, size, size, generator=g), torch.randint(0, CLASSES, (b,), generator=g)


def classify_batch(pad_id=0, seed=0, num_labels=3):
    ids, mask = tokens(seed), right_padding()
    ids = ids.masked_fill(mask == 0, pad_id)
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, num_labels, (B,), generator=_gen(seed + 1))


def seq2seq_batch(start_id, pad_id, seed=0, td=5):
    ids, mask = tokens(seed), right_padding()
    ids = ids.masked_fill(mask == 0, pad_id)
    dec = tokens(seed + 1, t=td)
    labels = dec.roll(-1, 1)
    labels[:, -1] = -100
    dec[:, 0] = start_id
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}, labels


def seeded(fn):
    @functools.wraps(fn)
    def build():
        torch.manual_seed(0)
        return fn()

    return build


def _hf(model_cls, config, batch, loss):
    model = model_cls(config).eval()
    inputs, targets = batch
    return model, loss, inputs, targets


def _tf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------------------------- transformers
DEC = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, max_position_embeddings=16, pad_token_id=0)


@case("hf-gpt2", "transformers")
@seeded
def hf_gpt2():
    tf = _tf()
    cfg = tf.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0,
                        attn_pdrop=0, pad_token_id=0)
    return _hf(tf.GPT2LMHeadModel, cfg, lm_batch(), token_ce)


@case("hf-llama", "transformers")
@seeded
def hf_llama():
    tf = _tf()
    return _hf(tf.LlamaForCausalLM, tf.LlamaConfig(**DEC), lm_batch(), token_ce)


@case("hf-mistral", "transformers")
@seeded
def hf_mistral():
    tf = _tf()
    return _hf(tf.MistralForCausalLM, tf.MistralConfig(**DEC, sliding_window=4), lm_batch(), token_ce)


@case("hf-qwen2", "transformers")
@seeded
def hf_qwen2():
    tf = _tf()
    return _hf(tf.Qwen2ForCausalLM, tf.Qwen2Config(**DEC, tie_word_embeddings=True), lm_batch(), token_ce)


@case("hf-gemma", "transformers", float32_inside=True)  # GemmaRMSNorm: x.float(), then (1 + weight.float())
@seeded
def hf_gemma():
    tf = _tf()
    return _hf(tf.GemmaForCausalLM, tf.GemmaConfig(**DEC, head_dim=8), lm_batch(), token_ce)


@case("hf-opt", "transformers")
@seeded
def hf_opt():
    tf = _tf()
    cfg = tf.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                       pad_token_id=1)
    return _hf(tf.OPTForCausalLM, cfg, lm_batch(pad_id=1), token_ce)


@case("hf-gpt-neo", "transformers")
@seeded
def hf_gpt_neo():
    tf = _tf()
    cfg = tf.GPTNeoConfig(vocab_size=V, max_position_embeddings=16, hidden_size=16, num_layers=2,
                          attention_types=[[["global", "local"], 1]], num_heads=2, window_size=4, intermediate_size=32,
                          embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, pad_token_id=0)
    return _hf(tf.GPTNeoForCausalLM, cfg, lm_batch(), token_ce)


@case("hf-bloom", "transformers")
@seeded
def hf_bloom():
    tf = _tf()
    cfg = tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0, attention_dropout=0.0,
                         pad_token_id=0)
    return _hf(tf.BloomForCausalLM, cfg, lm_batch(), token_ce)


ENC = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)


@case("hf-bert", "transformers")
@seeded
def hf_bert():
    tf = _tf()
    inputs, y = classify_batch()
    inputs["token_type_ids"] = (torch.arange(T) >= 3).long().expand(B, T).clone()
    return _hf(tf.BertForSequenceClassification, tf.BertConfig(**ENC, pad_token_id=0), (inputs, y), class_ce)


@case("hf-roberta", "transformers")
@seeded
def hf_roberta():
    tf = _tf()
    cfg = tf.RobertaConfig(**{**ENC, "max_position_embeddings": 16 + 2}, pad_token_id=1)
    return _hf(tf.RobertaForSequenceClassification, cfg, classify_batch(pad_id=1), class_ce)


@case("hf-distilbert", "transformers")
@seeded
def hf_distilbert():
    tf = _tf()
    cfg = tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
                              dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3, pad_token_id=0)
    return _hf(tf.DistilBertForSequenceClassification, cfg, classify_batch(), class_ce)


@case("hf-albert", "transformers")
@seeded
def hf_albert():
    tf = _tf()
    cfg = tf.AlbertConfig(**ENC, embedding_size=8, num_hidden_groups=1, classifier_dropout_prob=0.0, pad_token_id=0)
    return _hf(tf.AlbertForSequenceClassification, cfg, classify_batch(), class_ce)


SEQ2SEQ = dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0)


@case("hf-bart", "transformers")
@seeded
def hf_bart():
    tf = _tf()
    cfg = tf.BartConfig(**SEQ2SEQ, max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, scale_embedding=True)
    return _hf(tf.BartForConditionalGeneration, cfg, seq2seq_batch(start_id=2, pad_id=1), token_ce)


@case("hf-t5", "transformers")
@seeded
def hf_t5():
    tf = _tf()
    cfg = tf.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    inputs, labels = seq2seq_batch(start_id=0, pad_id=0)
    # the default key-value cache: T5's relative position bias goes to its attention module, on the generic rule,
    # which re-runs the call with the cache as it was then (empty; NOTE [state passed to a call])
    return _hf(tf.T5ForConditionalGeneration, cfg, (inputs, labels), token_ce)


@case("hf-whisper", "transformers")
@seeded
def hf_whisper():
    tf = _tf()
    cfg = tf.WhisperConfig(**SEQ2SEQ, num_mel_bins=8, max_source_positions=8, max_target_positions=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    g = _gen(0)
    dec = tokens(1, t=5)
    dec[:, 0] = 1
    inputs = {"input_features": torch.randn(B, 8, 16, generator=g), "decoder_input_ids": dec}
    return _hf(tf.WhisperForConditionalGeneration, cfg, (inputs, tokens(2, t=5)), token_ce)


AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
             conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
             hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
             final_dropout=0.0, mask_time_prob=0.0, num_labels=3, classifier_proj_size=8)


def audio_batch():
    g = _gen(0)
    return {"input_values": torch.randn(B, 96, generator=g)}, torch.randint(0, 3, (B,), generator=g)


@case("hf-wav2vec2", "transformers")
@seeded
def hf_wav2vec2():
    tf = _tf()
    return _hf(tf.Wav2Vec2ForSequenceClassification, tf.Wav2Vec2Config(**AUDIO), audio_batch(), class_ce)


VIS = dict(image_size=IMG, num_labels=CLASSES)
VIT = dict(**VIS, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _pixels():
    x, y = images()
    return {"pixel_values": x}, y


@case("hf-vit", "transformers")
@seeded
def hf_vit():
    tf = _tf()
    return _hf(tf.ViTForImageClassification, tf.ViTConfig(**VIT), _pixels(), class_ce)


@case("hf-dinov2", "transformers")
@seeded
def hf_dinov2():
    tf = _tf()
    return _hf(tf.Dinov2ForImageClassification, tf.Dinov2Config(**VIT, layerscale_value=0.5), _pixels(), class_ce)


@case("hf-convnext", "transformers")
@seeded
def hf_convnext():
    tf = _tf()
    cfg = tf.ConvNextConfig(**VIS, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], layer_scale_init_value=0.5)
    return _hf(tf.ConvNextForImageClassification, cfg, _pixels(), class_ce)


@case("hf-convnextv2", "transformers")
@seeded
def hf_convnextv2():
    tf = _tf()
    cfg = tf.ConvNextV2Config(**VIS, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    model, loss, inputs, y = _hf(tf.ConvNextV2ForImageClassification, cfg, _pixels(), class_ce)
    with torch.no_grad():  # GRN's gamma and beta start at zero, which hides a missing term
        for name, p in model.named_parameters():
            if "grn" in name:
                p.normal_(0, 0.5)
    return model, loss, inputs, y


@case("hf-swin", "transformers")
@seeded
def hf_swin():
    tf = _tf()
    cfg = tf.SwinConfig(**VIS, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return _hf(tf.SwinForImageClassification, cfg, _pixels(), class_ce)


@case("hf-mobilevit", "transformers")
@seeded
def hf_mobilevit():
    tf = _tf()
    cfg = tf.MobileViTConfig(**VIS, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
                             num_attention_heads=2, mlp_ratio=2.0, expand_ratio=2.0, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    model, loss, inputs, y = _hf(tf.MobileViTForImageClassification, cfg, _pixels(), class_ce)
    # transformers' initialisation (std 0.02) lets this tiny network's activations vanish (1e-33 by its last
    # stage): every row of a layer is then equal and nothing is tested. Variance-preserving weights instead
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model, loss, inputs, y


# ----------------------------------------------------------------------------------------------- peft
def _lora(model, targets):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B random too (the default zero B makes every gradient of A zero)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                            init_lora_weights=False)).eval()


@case("peft-lora-gpt2", "transformers", "peft")
@seeded
def peft_gpt2():
    model, loss, inputs, y = hf_gpt2()
    return _lora(model, ["c_attn", "c_proj"]), loss, inputs, y


@case("peft-lora-llama", "transformers", "peft")
@seeded
def peft_llama():
    model, loss, inputs, y = hf_llama()
    return _lora(model, ["q_proj", "v_proj", "down_proj"]), loss, inputs, y
