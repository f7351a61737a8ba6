"""The remedies a finding can name: one vocabulary for the diagnosis, gw.check and the doctor."""

from __future__ import annotations

REMEDIES = {
    "relu": "swap tanh/sigmoid for ReLU-type activations (ReLU, GELU, SiLU)",
    "leaky": "use a ReLU variant that never dies (LeakyReLU, GELU, SiLU)",
    "he_init": "He (Kaiming) initialisation for ReLU-type nets",
    "lecun_init": "LeCun normal initialisation, Var(w) = 1/fan_in (kaiming_normal_ with nonlinearity='linear'): the "
                  "init SELU's self-normalisation assumes (Klambauer et al. 2017); He's doubled variance makes a deep "
                  "SELU net explode",
    "one_factor_init": "of each product whose factors all start at 0, the first drawn at random (Kaiming uniform, "
                       "as nn.Linear draws its weight) and the others left at 0: the output is unchanged at the start "
                       "and every factor gets a gradient (LoRA's own init: A at random, B at 0; Hu et al. 2021)",
    "orthogonal_init": "orthogonal or Xavier initialisation, or LSUV (Mishkin & Matas 2016)",
    "smaller_init": "weights re-initialised at a variance-preserving scale (Xavier/orthogonal with the activation's gain, or "
                    "LSUV to unit variance)",
    "rescale_weights": "every layer's weights after the first divided by the gradient's measured growth per layer: a "
                       "re-initialisation measured on this net, for an activation whose gain no formula knows (SIREN's "
                       "sin(ω₀·x) wants weights ω₀ times smaller than a linear layer's default, Sitzmann et al. 2020)",
    "zero_bias": "initialise biases at zero",
    "redraw_zero": "draw the weights of a layer that starts at exactly 0 at random (PyTorch's default init, "
                   "reset_parameters()), or at a small scale",
    "unscale_before_clip": "scaler.unscale_(optimizer) before clip_grad_norm_, so that the bound applies to the "
                           "gradients themselves, not to them × the loss scale (torch.amp's docs, 'Gradient clipping')",
    "create_graph": "a gradient penalty's gradient taken with torch.autograd.grad(…, create_graph=True), so that "
                    "the penalty's own gradient reaches the weights",
    "torch_optimizer": "torch.optim's own optimizer in place of the one written by hand (the torch class its name "
                       "names, Adam where it names none), the same parameter groups and settings",
    "residual": "residual connections around blocks",
    "norm": "normalisation (BatchNorm/LayerNorm) before the activations",
    "clip_norm": "gradient-norm clipping (torch.nn.utils.clip_grad_norm_, Pascanu et al. 2013)",
    "lower_lr": "a lower learning rate (or warm-up)",
    "raise_lr": "a higher learning rate (×10 to ×1000, or Adam at 1e-3): steps that move a weight by a small share "
                "of itself (10⁻⁴ or less) change nothing in thousands of steps",
    "check_graph": "find where forward leaves the autograd graph before these layers' output reaches the loss "
                   "(.detach(), .numpy()/.item()/.tolist(), torch.no_grad(), torch.tensor(…)) and use torch operations "
                   "on the tensor itself; where an index (argmax, topk) selects with their output, a selection that "
                   "passes a gradient: F.gumbel_softmax(…, hard=True) or a straight-through softmax",
    "mean_reduction": "average the loss over the batch (reduction='mean', PyTorch's default): a loss summed over B "
                      "samples makes every gradient B times larger, and with SGD every step",
    "lower_eps": "Adam's eps at its default 1e-8 (optimizer param_groups' eps): an eps above the gradient's rms divides "
                 "every step by eps instead of by the gradient's own scale",
    "smaller_l1": "a smaller coefficient on the L1 penalty of the activations (its gradient pushes every active unit "
                  "towards 0 by the coefficient, and one pushed below 0 for every input never fires again), or "
                  "resample dead units (Bricken et al. 2023)",
    "gumbel_temperature": "a Gumbel-softmax temperature near 1, annealed no lower than 0.5 (τ = max(0.5, exp(−r·t)), "
                          "Jang et al. 2017 §4), or hard=True (straight-through) at that τ where the forward pass "
                          "needs a discrete sample",
    "straight_through": "a straight-through estimator around a step-like operation, x + (f(x) − x).detach() "
                        "(Bengio et al. 2013): its forward is f(x), its gradient the identity's",
    "drop_rounding": "train on the output itself: round, floor or sign the predictions only to report them (accuracy, "
                     "a 0/1 answer), never between the output and the loss",
    "remove_backward_hooks": "remove the backward hooks before training (keep the handle that "
                             "register_full_backward_hook returns and call its .remove()), or train a copy of the "
                             "model that has none",
    "hook_once": "register a gradient hook once, where the model is built, not in forward(); or on the tensor this "
                 "call computed (it dies with the step), and keep the handle to .remove() it",
    "normalise_embeddings": "normalise the embeddings before their similarities (F.normalize(z, dim=-1), as "
                            "SimCLR, SupCon and CLIP do): logits z_i·z_j/τ of unit vectors stay within ±1/τ",
    "norm_stats_in_graph": "compute a hand-written normalisation's mean and variance in the graph (no .detach(), "
                           "torch.no_grad() or .data on them), or use nn.BatchNorm/nn.LayerNorm/nn.GroupNorm: its "
                           "backward then passes nothing along what the normalisation removes",
    "chain_grad_output": "multiply what the backward of your torch.autograd.Function returns by the gradient it "
                         "receives, return grad_output * φ'(x) (the chain rule): without it the gradient below is "
                         "φ'(x) alone, unrelated to the loss",
    "tame_custom_backward": "scale the backward of your torch.autograd.Function to a gain of 1 or less: a "
                            "gradient-reversal layer's λ ramped from 0 to 1 over training (Ganin et al. 2016, "
                            "§5.2.2), a surrogate derivative no steeper than the unit step's width allows",
    "custom_backward": "widen the backward of your torch.autograd.Function (a straight-through estimator or "
                       "surrogate derivative) to its inputs' usual range: Hubara et al. 2016 pass |x| ≤ 1 for "
                       "pre-activations at unit scale, Neftci et al. 2019 a surrogate as wide as the potential's "
                       "spread; one that passes the gradient in a narrow window cuts it at every layer",
    "masked_rows": "give every attention row at least one key it may attend to (a [CLS] token never masked), or mask "
                   "with a large finite negative (torch.finfo(dtype).min, as Hugging Face does) in place of −inf, so "
                   "that a row with every key masked is a uniform softmax, not 0/0",
    "rebuild_optimizer": "build the optimizer once the model is complete — after adding or replacing layers and "
                         "after .to(device) — over model.parameters() (the optimizer holds the tensors it was given, "
                         "not the module)",
    "plateau_mode_min": "ReduceLROnPlateau(mode='min') for a loss it is stepped on (mode='max' for a score such as "
                        "accuracy)",
    "schedule_per_epoch": "step the learning-rate scheduler as its parameters count: once per epoch for StepLR's "
                          "step_size, MultiStepLR's milestones and ExponentialLR's gamma (or give them in batches); "
                          "scheduler.step() after optimizer.step()",
    "smaller_step": "a smaller step in the repeated update (more steps over the same horizon, dt·λ_max < 2 for "
                    "explicit Euler) or a semi-implicit / implicit step for stiff dynamics (Hairer & Wanner, Solving "
                    "ODEs II, §IV.2; Kim et al. 2021, stiff neural ODEs)",
    "impute_inputs": "replace the inputs' missing values before training (the training columns' means, or "
                     "torch.nan_to_num), or drop the rows that hold them",
    "check_data": "check the inputs and the loss for NaN/Inf, and log/division/sqrt of values near 0",
    "grad_scaler": "with float16, torch.amp.GradScaler",
    "same_shape": "give the output and the targets the same shape before the loss — out.squeeze(-1) against "
                  "targets of shape (B,), or targets.view_as(out): (B, 1) against (B,) broadcasts to (B, B)",
    "adamw": "torch.optim.AdamW with the same settings (or Adam(…, decoupled_weight_decay=True)): its decay shrinks "
             "the weights apart from the gradient, lr·λ·w a step, where Adam's weight_decay is an L2 term it "
             "normalises (Loshchilov & Hutter 2019)",
    "adam_betas": "Adam's usual betas=(0.9, 0.999): β1 for the step's direction (~10 steps), β2 for its scale (~1000)",
    "zero_grad_order": "optimizer.zero_grad() before the forward pass (or right after optimizer.step()), never "
                       "between loss.backward() and optimizer.step(); and the step after the backward",
    "checkpoint_inputs": "torch.utils.checkpoint(…, use_reentrant=False), which gives the checkpointed layers "
                         "gradients whatever their inputs; or an input that requires grad (x.requires_grad_(), "
                         "transformers' model.enable_input_require_grads())",
    "log_softmax": "log-probabilities to the NLL loss: nn.LogSoftmax(dim=1) as the model's last layer "
                   "(F.log_softmax(z, dim=1)), or nn.CrossEntropyLoss on the raw scores, which applies it itself",
    "ctc_zero_infinity": "zero_infinity=True in torch.nn.CTCLoss / F.ctc_loss (an input too short for its target "
                         "then adds 0, not +inf), or drop the samples whose input is shorter than their target",
    "positions": "add the tokens' positions to their embeddings: a learned positional embedding, or sinusoids "
                 "(Vaswani et al. 2017, §3.5; gradwatch.remedies.add_positions), or rotary embeddings",
    "pack": "pack the padded batch (torch.nn.utils.rnn.pack_padded_sequence with the true lengths) or read each "
            "sequence's output at its own last step, out[i, length_i − 1], not at the padded end; or pad in front",
    "shuffle": "shuffle the training samples every epoch (DataLoader(…, shuffle=True), or torch.randperm over the "
               "indices), so that every batch draws from every class",
    "no_collapse": "a loss with no minimum at a constant output — in a triplet loss, semi-hard negatives (d_ap < "
                   "d_an < d_ap + α, Schroff et al. 2015 eq. 4) in place of the hardest: the hardest only once the "
                   "embedding has spread; in a contrastive loss, more negatives",
    "pos_weight": "weigh the rare class up: BCEWithLogitsLoss(pos_weight=n_negative / n_positive) (or weight= per "
                  "sample for nn.BCELoss), or draw the classes equally (torch.utils.data.WeightedRandomSampler); and "
                  "judge the model by a threshold-free score (average precision) or a threshold set on held-out data",
    "class_weight": "weigh the rare classes up: CrossEntropyLoss(weight=…) with each class's weight inverse to its "
                    "frequency (n / (C·n_c)), or draw the classes equally (torch.utils.data.WeightedRandomSampler); "
                    "and judge the model by a score that weighs the classes equally (balanced accuracy, macro F1)",
    "prior_bias": "the output layer's bias at −log((1 − π)/π), π the targets' positive rate (Lin et al. 2017, §3.3, "
                  "π = 0.01 for RetinaNet's classifier): the output starts at the targets' rate, not at 0.5",
    "fp32_weights": "weights kept in float32, the forward pass under torch.autocast(dtype=torch.float16) with a "
                    "torch.amp.GradScaler (which refuses float16 parameters' gradients), or bfloat16",
    "master_weights": "float32 master weights: the parameters in float32 and the forward pass under "
                      "torch.autocast(dtype=torch.bfloat16) (or float16), so the update is added where a step of 10⁻⁵ "
                      "of a weight is not lost (Micikevicius et al. 2018, §3.1); or stochastic rounding",
    "fp16_eps": "an eps that float16 can hold — 1e-4 (optimizer param_groups' eps) — or the weights in float32 "
                "under torch.autocast, where the optimizer's arithmetic runs in float32",
    "bf16": "bfloat16 autocast in place of float16 (float32's range: no loss scaling, no skipped steps)",
    "orthogonal_rnn": "orthogonal recurrent weights kept orthogonal (gradwatch.remedies.orthogonal_recurrent)",
    "gated": "a GRU in place of the vanilla cell (or an LSTM, forget-gate bias 1)",
    "pascanu_reg": "Pascanu's norm-preserving regulariser Ω (gradwatch.remedies.pascanu_regularizer)",
    "forget_bias": "an LSTM forget-gate bias of 1 (Gers et al. 2000; gradwatch.remedies.lstm_forget_bias)",
    "chrono_init": "chrono initialisation of the LSTM gates for dependencies up to the sequence's length: forget-gate "
                   "bias log U(1, T − 1), input-gate bias its negative (Tallec & Ollivier 2018; "
                   "gradwatch.remedies.lstm_chrono_init)",
    "irnn": "identity-initialised ReLU RNN (gradwatch.remedies.irnn, Le et al. 2015)",
    "smaller_w_hh": "recurrent weights with spectral radius below 1 (gradwatch.remedies.smart_init)",
    "backward_singularity": "keep the arguments of sqrt, norms and fractional powers off 0 (torch.sqrt(s + 1e-8), or "
                            "the squared distance) and mask before such an operation, not after it (torch.where's "
                            "untaken branch still back-propagates its NaN); take logarithms in log space "
                            "(torch.logsumexp of log-densities, F.log_softmax), not of a sum that underflows to 0; add εI to a matrix "
                            "before torch.linalg.eigh or svd (their gradients divide by the gaps between eigenvalues)",
    "logits_loss": "return logits and use the loss on them (nn.BCEWithLogitsLoss, F.cross_entropy): a sigmoid or "
                   "softmax output at exactly 0 or 1 in float32 passes no gradient back to its logits",
    "gate_bias": "gate biases that keep the state at the start: the update gate towards the old state (PyTorch's "
                 "GRU, h' = (1 − z)·n + z·h, a bias of +1 to +3 on z; the other way in the (1 − z)·h + z·ñ "
                 "convention), an LSTM's forget gate +1, or chrono initialisation (Tallec & Ollivier 2018)",
    "divide_accumulated": "with gradient accumulation over k micro-batches, divide each micro-batch's loss by k before "
                          "backward() (or lower the learning rate k-fold): the step should apply their mean gradient",
    "zero_grad": "call optimizer.zero_grad() once per step, before loss.backward(): .grad accumulates, so without it "
                 "each step applies the sum of every gradient so far",
    "gradient_penalty": "a gradient penalty in place of weight clipping (WGAN-GP, Gulrajani et al. 2017): "
                        "λ·(‖∇ₓD(x̂)‖ − 1)² at points x̂ between real and generated samples, λ = 10",
    "nonsaturating": "for a GAN generator, the non-saturating loss −log D(G(z)) (Goodfellow et al. 2014)",
    "param_groups": "check the optimizer's parameter groups: learning rate and weight decay of these layers",
    "standardise_inputs": "standardise the inputs (a normalisation layer at the input, fitted on the training batches)",
    "standardise_targets": "standardise regression targets (train on (y − mean)/std, predict mean + std·output): "
                           "a squared error on targets in the hundreds or more makes the gradient as large",
    "swap_overflow": "swap an overflowing activation (exp, softplus-like growth) for a bounded or ReLU-type one",
    "adam": ("an adaptive optimiser (Adam) in place of plain SGD or Adagrad: its step does not shrink with the "
             "gradient's scale, nor with time"),
    "warmup": "learning-rate warm-up (torch.optim.lr_scheduler.LinearLR)",
    "finish_warmup": "a warm-up the run finishes: its warm-up steps set from the steps you train (5–10 % of them; "
                     "num_warmup_steps, LinearLR's total_iters), so that the rate reaches its base",
    "pre_ln": "Pre-LN Transformer layers (norm_first=True; Xiong et al. 2020)",
    "fixup": "Fixup: zero-initialised residual branches (Zhang et al. 2019; gradwatch.remedies.fixup_zero_init)",
    "rezero": "ReZero residual connections, x + α·f(x) with α = 0 at init (Bachlechner et al. 2020)",
    "identity_init": "identity or orthogonal initialisation of deep linear and recurrent weights (Saxe et al. 2014; Le et al. 2015)",
    "clip_lower_lr": "gradient-norm clipping together with a lower learning rate",
    "smaller_init_lower_lr": "weights re-initialised (Xavier) together with a lower learning rate",
    "no_zero_clip": "never clip at 0: clip_grad_norm_(…, max_norm=0) and clip_grad_value_(…, 0) set every gradient to "
                    "0; leave the call out where a config's 0 means 'no clipping', or clip at about the gradient's "
                    "own norm",
    "raise_clip": "clip at about the gradient's own norm (its median over calm steps, Pascanu et al. 2013), not below "
                  "it: a bound that every step hits makes plain SGD a fixed-length step",
    "smooth_activation": "a smooth activation (tanh, SiLU, softplus) in place of ReLU where the loss reads the net's "
                         "derivatives in its input (a physics-informed residual): ReLU's second derivative is 0",
    "leaky_slope": "give nn.LeakyReLU its intended negative slope (0.01, PyTorch's default): "
                   "nn.LeakyReLU(inplace=True), not nn.LeakyReLU(True), whose first argument is negative_slope",
    "guard_division": "guard the operation the batch made undefined: clamp a count or a norm away from 0 before "
                      "dividing (sum(l·m) / m.sum().clamp(min=1)), skip a batch with nothing to average, keep a log's "
                      "or a square root's argument positive",
    "clip_before_step": "clip between loss.backward() and optimizer.step() (backward, clip_grad_norm_, step): a clip "
                        "after the step changes a gradient the step has already applied",
    "step_scheduler": "call scheduler.step() after each optimizer.step(): a scheduler sets the rate to its factor "
                      "at step 0 when it is built (0 at a linear warm-up's start: get_linear_schedule_with_warmup, "
                      "LambdaLR, LinearLR(start_factor=0)) and moves it only when stepped",
    "norm_scale_one": "start every normalisation layer's scale γ at 1 (PyTorch's default); a γ of 0 belongs only "
                      "to the last norm of a residual branch, where the skip connection carries the signal (Goyal et "
                      "al. 2017, §5.1)",
    "positive_log_input": "give the logarithm in the loss a positive input: a log-rate with "
                          "nn.PoissonNLLLoss(log_input=True) (the default), or the output through softplus or exp "
                          "before a log of your own",
    "padding_idx": "give padding_idx only to an index that is padding (nn.Embedding(…, padding_idx=None) where every "
                   "index is data), or shift the real indices past it: the padding row stays 0 and never learns",
    "minimize": "step down the gradient: the optimizer with maximize=False (the default), or a step written "
                "params -= lr * grad",
    "set_lr": "give the optimizer a learning rate above 0 (lr=1e-3 for Adam, 0.01–0.1 for SGD, or each param "
              "group's 'lr')",
    "layer_decay_once": "apply a per-group factor once, to the groups' base rates (lr_i = lr · decay^(L − i) when "
                        "the optimizer is built), not in a scheduler's lambda or a loop that multiplies the rates "
                        "again at every step, where it compounds to 0",
    "restore_weights": "put the trained weights back after evaluating with averaged ones (an EMA's store(), "
                       "copy_to(), evaluate, restore()), or evaluate a separate averaged copy "
                       "(torch.optim.swa_utils.AveragedModel): training must go on from the optimizer's weights",
    "biased_variance": "take a variance over a single element with correction=0 (unbiased=False): torch.var and "
                       "torch.std divide by n − 1 by default, 0/0 where n = 1 (an instance statistic over a 1×1 map)",
    "weight_norm_init": "initialise a layer's weight before weight normalisation wraps it, never at 0 (g = ‖v‖ = 0 "
                        "makes g·v/‖v‖ = 0/0); to start the layer at 0, set g to 0 after wrapping",
    "logit_scale": "let the logits reach their usual scale: divide them by a temperature (z / τ), never multiply, "
                   "and remove any constant that shrinks them before the softmax",
    "layer_in_init": "build every layer in __init__ (self.fc = nn.Linear(…)) and only call it in forward(): a layer "
                     "built inside forward() is drawn at random again on every call, and no optimizer holds it",
    "exp_log_space": "compute a loss over exponentials in log space: F.cross_entropy or torch.logsumexp on the "
                     "exponents themselves (similarities over τ, logits), in place of torch.exp then a sum and a log",
    "log_of_product": "compute a long product of probabilities in log space: the sum (or torch.cumsum) of the "
                      "factors' logarithms — F.logsigmoid(−z) for 1 − σ(z), torch.log1p(−p) for 1 − p — in place of "
                      "torch.log(torch.cumprod(…)) or torch.log(torch.prod(…))",
    "log_space": "compute the logarithm of a sigmoid or softmax output in log space (F.logsigmoid(z), "
                 "F.logsigmoid(−z) for log(1 − σ(z)), F.log_softmax), or the loss on the logits",
    "signed_targets": "give nn.SoftMarginLoss targets of −1 and +1 (2·y − 1 from 0/1 labels), or train the 0/1 "
                      "labels under nn.BCEWithLogitsLoss",
    "bool_mask": "give nn.MultiheadAttention (a Transformer layer's mask, src_key_padding_mask) a boolean mask, True "
                 "where masked (mask.bool()), or −inf where masked: a float mask is added to the scores",
    "detach_reference": "detach the term the loss compares the output with (logp_old = logp.detach() in PPO's "
                        "ratio, a target computed from the model under torch.no_grad()): a tensor taken from itself "
                        "is the constant 0",
    "sum_reconstruction": "sum the reconstruction over each sample's elements as the KL is summed over the latent "
                          "dimensions (reduction='sum', as pytorch/examples' VAE), or weigh the KL down by as many",
    "sample_weights": "give WeightedRandomSampler one weight per sample (class_weights[labels]) and num_samples the "
                      "data set's size, or check the sampler's and the data set's indices",
    "smoothing_weights": "label smoothing without class weights, or class weights without label smoothing: "
                         "nn.CrossEntropyLoss weighs the smoothing term by the class weights too "
                         "(pytorch/pytorch#104776); or smooth by hand with an unweighted term",
    "tied_init": "draw the tied matrix at an output layer's scale: nn.init.normal_(emb.weight, std=0.02) before tying "
                 "(GPT-2), or scale the logits by d^(−1/2) (T5)",
    "squash_before_ratio": "a sigmoid (one channel) or softmax (over the classes) on the output before a soft Dice or "
                           "IoU: torch.sigmoid(logits) in the loss, the logits kept for everything else",
    "loss_floor": "a loss with a gradient where it is held at its floor: GIoU or DIoU for boxes (Rezatofighi et al. "
                  "2019), a smooth surrogate (softplus in place of max(0, ·)), or outputs that start where the clamp "
                  "is open (anchors or an initialisation whose boxes overlap the targets)",
    "scale_free_error": "an error that does not divide by the targets: the absolute or squared error on "
                        "standardised targets, MASE (scaled by a naive forecast's mean error), or at least |y| + ε in "
                        "the divisor",
    "reset_weights": "start from an initialisation: re-initialise the model (each module's reset_parameters()) and "
                     "build a fresh optimizer — or load the weights saved before the learning-rate range test "
                     "(lr_finder.reset())",
    "prune_per_layer": "prune layer by layer (prune.l1_unstructured on each module at the sparsity wanted), or keep a "
                       "share of every layer's weights (SynFlow's iterative scores): a global threshold takes whole "
                       "layers",
    "detach_advantage": "detach the advantage in the policy term, −log π(a)·(R − V).detach(): the critic learns from "
                        "its own squared error only, and the policy term moves the policy alone",
    "entropy_bonus_sign": "subtract the entropy bonus, loss = policy loss − β·H(π): a loss that is minimised lowers an "
                          "entropy added to it, and the policy turns one-hot",
    "positive_loss_weights": "keep learned loss weights positive: Kendall et al. 2018's exp(−s)·L + s with s = log σ² "
                             "learned, or softplus(w)·L — a free multiplier driven through 0 makes the loss unbounded "
                             "below",
    "bounded_objective": "give the loss a minimum: check the signs of its log-determinant and log-variance terms "
                         "(a flow's loss is −(log p(z) + log|det J|)), and floor a learned variance or scale "
                         "(softplus + ε)",
    "probability_targets": "give a binary cross-entropy targets in [0, 1] (pixels scaled to [0, 1], not "
                           "standardised), or a squared error where the targets are not probabilities",
    "keep_state_graph": "keep the recurrent state in the graph within a sequence: detach it between sequences or "
                        "chunks of steps (truncated backpropagation through time), not at every step",
    "scaler_step": "step through the scaler: scaler.step(optimizer) and scaler.update() in place of "
                   "optimizer.step() (they unscale the gradients and skip a step with NaN/Inf)",
    "one_logit_loss": "a binary loss on the one logit — nn.BCEWithLogitsLoss with 0/1 targets — or two output units "
                      "under nn.CrossEntropyLoss with class indices",
    "drop_single_norm": "drop the normalisation over a single element (a LayerNorm over one output feature), or "
                        "give a GroupNorm groups of several channels (GroupNorm(C // 8, C), not GroupNorm(C, C) on "
                        "1×1 maps): normalise over several values, not over one",
    "invert_padding_mask": "give nn.MultiheadAttention (a Transformer layer's src_key_padding_mask) True where a key "
                           "is padding — attention_mask == 0 from Hugging Face's attention_mask, whose 1s mark the "
                           "real tokens",
    "batch_first": "batch_first=True on the attention and recurrent layers given (batch, seq, feature) inputs (or "
                   "transpose their inputs to (seq, batch, feature))",
    "group_norm": "GroupNorm (or a larger batch, 16 or more) in place of BatchNorm: statistics of a few samples are "
                  "noise, and GroupNorm's do not depend on the batch (Wu & He 2018)",
    "train_mode": "call model.train() before training (model.eval() only around evaluation): in eval mode BatchNorm "
                  "normalises with its running statistics instead of the batch's, and Dropout is off",
    "lower_momentum": "momentum 0.9, the usual (optimizer param_groups' momentum): at 0.99 or more each step sums a "
                      "hundred past gradients or more, and overshoots",
    "lower_dropout": "a dropout rate of 0.1–0.5 (nn.Dropout's p is the probability to drop a unit; TF1's keep_prob "
                     "0.9 is p = 0.1)",
    "lower_wd": "a much smaller weight decay (1e-4 to 1e-2 is usual; optimizer param_groups' weight_decay): at this one "
                "every step pulls the weights towards zero faster than the gradient can move them",
    "logits": "pass logits to the loss: drop the softmax at the output (nn.CrossEntropyLoss applies log-softmax itself; "
              "keep a softmax for predictions only, outside the loss)",
    "linear_output": "drop the output's sigmoid, tanh or ReLU (a linear output), or rescale the targets into its "
                     "range: a squared error wants an output that can reach its targets",
    "drop_output_relu": "drop the ReLU after the output layer: the loss wants the layer's outputs as they are (logits, "
                        "or a regression's values), and an output unit clipped at 0 for every input never learns again",
    "output_activation": "check the output layer and the loss: a softmax over a single unit is the constant 1 (use a sigmoid), and a loss on a detached or constant output passes no gradient",
    "margin_loss": "evaluate with a margin (Carlini–Wagner) loss on the logits, max_{j≠y} z_j − z_y, which does not saturate with the softmax",
    "bpda": "BPDA: attack through non-differentiable layers with a differentiable stand-in, e.g. the identity on the backward pass (Athalye, Carlini & Wagner 2018)",
    "eot": "EOT: average the gradient over the defence's randomness (Expectation over Transformation, Athalye et al. 2018)",
    "autoattack": "AutoAttack (Croce & Hein 2020): APGD with cross-entropy and DLR losses and the black-box Square attack (art.attacks.evasion.AutoAttack)",
    # Transformer instabilities (issue 15; gradwatch.remedies.transformer)
    "attention_scale": "scale the attention logits q·k by 1/√d_head (Vaswani et al. 2017, §3.2.1): unscaled, they grow "
                       "with the head dimension and the softmax goes one-hot from the start",
    "qk_layernorm": "qk-layernorm: LayerNorm on each head's queries and keys (Dehghani et al. 2023; Wortsman et al. 2023; "
                    "gradwatch.remedies.transformer.add_qk_norm)",
    "z_loss": "z-loss 1e-4·log²Z on the output logits (PaLM; Wortsman et al. 2023; gradwatch.remedies.transformer.with_z_loss)",
    "sigma_reparam": "σReparam on the attention projections, Ŵ = γ·W/σ(W) (Zhai et al. 2023; "
                     "gradwatch.remedies.transformer.sigma_reparam)",
    "skip_step": "skip the update of a step whose gradient norm is a robust outlier (PaLM, OLMo 2; "
                 "gradwatch.remedies.transformer.skip_step_on_spike)",
}


class RemedyText(str):
    """A remedy's words that remember their vocabulary key (``text.key``); compares and prints as the plain text."""

    key: str

    def __new__(cls, key: str, text: str) -> "RemedyText":
        obj = super().__new__(cls, text)
        obj.key = key
        return obj

    def __reduce__(self) -> tuple:
        return (RemedyText, (self.key, str(self)))


def key_of(text: str) -> str | None:
    """The vocabulary key of a remedy text: its own (``remedies()`` made it) or, for plain text, the entry it matches."""
    key = getattr(text, "key", None)
    if key is not None:
        return str(key)
    for k, v in REMEDIES.items():
        if v == text:
            return k
    if text.startswith("gradient-norm clipping"):  # the diagnosis words its own clipping threshold
        return "clip_norm"
    return None


def remedies(*keys: str) -> tuple[str, ...]:
    """The texts of the given keys, in order; each is a :class:`RemedyText` (a ``str`` that knows its key)."""
    return tuple(RemedyText(k, REMEDIES[k]) for k in keys)
