// The functional API's fast path to the native ops (fusedact/functional.py, `_run`), for
// the two calls that dominate a small tensor's cost: the no-grad forward and the plain
// autograd forward+backward. Same ops, same kernels, same results; only the trip there is
// shorter than torch.ops.fusedact.* from Python (argument parsing against the schema, the
// Python Autograd kernel, an autograd.Function applied from Python and its Python
// backward), which on small tensors costs more than the kernel.
// Measurements: benchmarks/NOTES.md, "The trip from Python to the ops".
//
//   no_grad(...)   the op below autograd, through the dispatcher (CPU or CUDA kernel,
//                  and any mode or subclass that sits below autograd)
//   autograd(...)  a C++ autograd Function: saves the inputs only; its backward is the
//                  fused backward op, called below autograd, or through the op's own
//                  Autograd kernel when a graph of the backward is wanted
//                  (create_graph=True: the second derivatives are the Python Functions'
//                  in fusedact/functions.py)
//
// Tensors of 256 KiB or more run with the GIL released, as under ATen's own bindings.
//
// Taken outside torch.compile, ONNX export and __torch_function__ overrides (checked
// here for swish with a float beta, mish and hard_swish; in Python for the others); it
// returns None inside a torch.func transform or for a dual tensor (forward-mode AD), and
// Python then goes the op's own way.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include <tuple>

#include "checks.h"

// Whether the torch being built against is major.minor or newer.
#define FUSEDACT_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace fusedact {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

using SwishFwd = Tensor(const Tensor&, double, const OptTensor&);
using SwishBwd = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, const OptTensor&);
using UnaryFwd = Tensor(const Tensor&);
using UnaryBwd = Tensor(const Tensor&, const Tensor&);
using AconFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using AconBwd = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, int64_t);
using BnStats = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, bool, double, double);
using BnApply = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, at::TensorList,
                       c10::string_view);
using BnTrain = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                                   const OptTensor&, at::TensorList, c10::string_view, double, double);
using BnGrad = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>(const Tensor&, const Tensor&, const OptTensor&,
                                                                       const OptTensor&, const Tensor&, const Tensor&,
                                                                       bool, at::TensorList, c10::string_view);

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Looked up once, on first use (the schemas are registered when _C loads).
struct Ops {
  c10::TypedOperatorHandle<SwishFwd> swish_fwd = op<SwishFwd>("fusedact::swish_forward");
  c10::TypedOperatorHandle<SwishBwd> swish_bwd = op<SwishBwd>("fusedact::swish_backward");
  c10::TypedOperatorHandle<UnaryFwd> mish_fwd = op<UnaryFwd>("fusedact::mish_forward");
  c10::TypedOperatorHandle<UnaryBwd> mish_bwd = op<UnaryBwd>("fusedact::mish_backward");
  c10::TypedOperatorHandle<UnaryFwd> hard_swish_fwd = op<UnaryFwd>("fusedact::hard_swish_forward");
  c10::TypedOperatorHandle<UnaryBwd> hard_swish_bwd = op<UnaryBwd>("fusedact::hard_swish_backward");
  c10::TypedOperatorHandle<AconFwd> acon_fwd = op<AconFwd>("fusedact::acon_c_forward");
  c10::TypedOperatorHandle<AconBwd> acon_bwd = op<AconBwd>("fusedact::acon_c_backward");
  c10::TypedOperatorHandle<BnStats> bn_stats = op<BnStats>("fusedact::bn_batch_stats");
  c10::TypedOperatorHandle<BnApply> bn_apply = op<BnApply>("fusedact::bn_act_apply");
  c10::TypedOperatorHandle<BnTrain> bn_train = op<BnTrain>("fusedact::bn_act_train");
  c10::TypedOperatorHandle<BnGrad> bn_grad = op<BnGrad>("fusedact::bn_act_grad");
};

const Ops& ops() {
  static const Ops instance;
  return instance;
}

// The op below autograd: what its Autograd kernel does when no gradient is wanted.
template <class Sig, class... A>
auto below_autograd(const c10::TypedOperatorHandle<Sig>& h, const A&... a) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return h.call(a...);
}

// A backward op from a C++ Function's backward: below autograd, unless the engine runs
// with create_graph=True (grad mode on), where the op's Autograd kernel records its
// differentiable Function.
template <class Sig, class... A>
auto backward_op(const c10::TypedOperatorHandle<Sig>& h, const A&... a) {
  if (at::GradMode::is_enabled()) return h.call(a...);
  return below_autograd(h, a...);
}

}  // namespace

// The C++ autograd Functions, named in grad_fn: CppNode<fusedact::MishFunction>.
struct SwishFunction : torch::autograd::Function<SwishFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double beta) {
    ctx->save_for_backward({x});
    ctx->saved_data["beta"] = beta;
    return below_autograd(ops().swish_fwd, x, beta, OptTensor());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor x = ctx->get_saved_variables()[0];
    const double beta = ctx->saved_data["beta"].toDouble();
    return {std::get<0>(backward_op(ops().swish_bwd, grads[0], x, beta, OptTensor())), Tensor()};
  }
};

// beta = 1 (SiLU, the common case): nothing to keep beside x.
struct SiluFunction : torch::autograd::Function<SiluFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    ctx->save_for_backward({x});
    return below_autograd(ops().swish_fwd, x, 1.0, OptTensor());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {std::get<0>(backward_op(ops().swish_bwd, grads[0], ctx->get_saved_variables()[0], 1.0, OptTensor()))};
  }
};

struct SwishTensorFunction : torch::autograd::Function<SwishTensorFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& beta) {
    ctx->save_for_backward({x, beta});
    return below_autograd(ops().swish_fwd, x, 1.0, OptTensor(beta));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dbeta] = backward_op(ops().swish_bwd, grads[0], saved[0], 1.0, OptTensor(saved[1]));
    return {dx, dbeta};
  }
};

// Mish and HardSwish: Self supplies fwd() and bwd(), the ops' handles.
template <class Self>
struct UnaryFunction : torch::autograd::Function<Self> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    ctx->save_for_backward({x});
    return below_autograd(Self::fwd(), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {backward_op(Self::bwd(), grads[0], ctx->get_saved_variables()[0])};
  }
};

struct MishFunction : UnaryFunction<MishFunction> {
  static const auto& fwd() { return ops().mish_fwd; }
  static const auto& bwd() { return ops().mish_bwd; }
};

struct HardSwishFunction : UnaryFunction<HardSwishFunction> {
  static const auto& fwd() { return ops().hard_swish_fwd; }
  static const auto& bwd() { return ops().hard_swish_bwd; }
};

struct AconCFunction : torch::autograd::Function<AconCFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta,
                        int64_t channel_dim) {
    ctx->save_for_backward({x, p1, p2, beta});
    ctx->saved_data["channel_dim"] = channel_dim;
    return below_autograd(ops().acon_fwd, x, p1, p2, beta, channel_dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t cd = ctx->saved_data["channel_dim"].toInt();
    auto [dx, dp1, dp2, dbeta] = backward_op(ops().acon_bwd, grads[0], s[0], s[1], s[2], s[3], cd);
    return {dx, dp1, dp2, dbeta, Tensor()};
  }
};

namespace {

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

// The activation's parameters as the passes take them (fusedact/batch_norm.py,
// _act_tensors): opmath-typed (C,), or (N, C) for Meta-ACON's beta; swish's beta per channel.
std::vector<Tensor> bn_act_tensors(const Tensor& x, const std::string& act, double beta, const Tensor& p1,
                                   const Tensor& p2, const Tensor& act_beta) {
  const auto pt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t C = x.size(1);
  if (act == "acon_c") {
    Tensor b = act_beta.reshape(-1);
    if (b.numel() != C) b = b.reshape({x.size(0), C});
    return {p1.reshape(-1).to(pt).contiguous(), p2.reshape(-1).to(pt).contiguous(), b.to(pt).contiguous()};
  }
  if (act == "swish" && act_beta.defined()) return {act_beta.reshape(1).to(pt).expand(C).contiguous()};
  if (act == "swish" && beta != 1.0) return {at::full({C}, beta, x.options().dtype(pt))};
  return {};
}

// The eager form's VJP (fusedact/batch_norm.py), for a backward that is differentiated
// again (create_graph=True); set from Python when the module loads.
pybind11::object& bn_act_vjp() {
  static auto* fn = new pybind11::object();  // leaked: no Python call at exit
  return *fn;
}

}  // namespace

// fusedact.batch_norm_act for a plain eager call: batch_norm_act's passes (bn_act_train,
// or bn_batch_stats and bn_act_apply with the running statistics; bn_act_grad in the
// backward), in one C++ Function. Saves x, the
// statistics and the parameters. Inputs: x, weight, bias, p1, p2, act_beta (undefined
// where None), then the rest; `act` is the kernel's (silu for swish at beta 1).
struct BatchNormActFunction : torch::autograd::Function<BatchNormActFunction> {
  // (y, mean, invstd): the forward's ops, below autograd
  static std::tuple<Tensor, Tensor, Tensor> values(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                   const OptTensor& p1, const OptTensor& p2, const OptTensor& act_beta,
                                                   const OptTensor& running_mean, const OptTensor& running_var,
                                                   bool training, double momentum, double eps, const std::string& act,
                                                   double beta) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Tensor none;
    auto t = [&](const OptTensor& o) { return o.has_value() ? *o : none; };
    const std::vector<Tensor> act_params = bn_act_tensors(x, act, beta, t(p1), t(p2), t(act_beta));
    if (training)
      return ops().bn_train.call(x, running_mean, running_var, weight, bias, act_params, act, momentum, eps);
    auto [mean, invstd] = ops().bn_stats.call(x, running_mean, running_var, training, momentum, eps);
    return {ops().bn_apply.call(x, mean, invstd, weight, bias, act_params, act), mean, invstd};
  }

  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& p1, const OptTensor& p2, const OptTensor& act_beta,
                        const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                        double eps, std::string act, double beta) {
    const Tensor none;
    auto t = [&](const OptTensor& o) { return o.has_value() ? *o : none; };
    auto [y, mean, invstd] =
        values(x, weight, bias, p1, p2, act_beta, running_mean, running_var, training, momentum, eps, act, beta);
    ctx->save_for_backward({x, t(weight), t(bias), mean, invstd, t(p1), t(p2), t(act_beta)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["beta"] = beta;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1], &bias = s[2], &mean = s[3], &invstd = s[4];
    const Tensor &p1 = s[5], &p2 = s[6], &act_beta = s[7];
    const bool training = ctx->saved_data["training"].toBool();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const double beta = ctx->saved_data["beta"].toDouble();
    variable_list out(13);
    if (at::GradMode::is_enabled()) {  // create_graph=True: the eager form's VJP, differentiable
      pybind11::gil_scoped_acquire gil;
      TORCH_CHECK(bn_act_vjp(), "fusedact: batch_norm_act's double backward is not set up");
      auto r = bn_act_vjp()(grads[0], x, opt(weight), opt(bias), mean, invstd, opt(p1), opt(p2), opt(act_beta),
                            training, ctx->saved_data["eps"].toDouble(), act, beta)
                   .cast<std::vector<c10::optional<Tensor>>>();
      for (size_t i = 0; i < 6 && i < r.size(); ++i) {
        const Tensor& input = s[i < 3 ? i : i + 2];  // x, weight, bias; p1, p2, act_beta after the statistics
        if (r[i].has_value() && input.defined()) out[i] = *r[i];
      }
      return out;
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::vector<Tensor> act_params = bn_act_tensors(x, act, beta, p1, p2, act_beta);
    auto [dx, dweight, dbias, sums] =
        ops().bn_grad.call(grads[0], x, opt(weight), opt(bias), mean, invstd, training, act_params, act);
    out[0] = dx;
    if (weight.defined()) out[1] = dweight;
    if (bias.defined()) out[2] = dbias;
    if (act == "acon_c") {
      const Tensor* ps[3] = {&p1, &p2, &act_beta};
      for (int j = 0; j < 3; ++j) out[3 + j] = sums[j].reshape(ps[j]->sizes()).to(ps[j]->scalar_type());
    } else if (act_beta.defined()) {
      out[5] = sums[0].sum().reshape(act_beta.sizes()).to(act_beta.scalar_type());
    }
    return out;
  }
};

namespace {

// Function<F>::apply(x, rest...) for the Functions above whose only tensor argument is x:
// the same node (CppNode<F>, the same fields, so the engine, hooks and compiled autograd
// see no difference), built without apply's general handling of several inputs and
// outputs, outputs that are inputs or views, dirty inputs and forward-mode AD. None of
// these can occur when the forward is our kernel: it returns a new tensor (fast_path_allowed
// declined dual tensors, and the caller checked wants_grad). Under a Python dispatch
// mode or for a tensor subclass below autograd the forward may return anything, and
// apply itself runs.
// Measurements: benchmarks/NOTES.md, "apply's general handling".
template <class F, class... Rest>
Tensor apply_on_x(const Tensor& x, Rest... rest) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python) || x.key_set().has(c10::DispatchKey::Python))
    return F::apply(x, rest...);
  using Node = torch::autograd::CppNode<F>;
#if FUSEDACT_TORCH_AT_LEAST(2, 13)
  auto node = c10::make_intrusive<Node>();  // 2.13 made nodes intrusive_ptr-owned
#else
  std::shared_ptr<Node> node(new Node(), torch::autograd::deleteNode);
#endif
  node->is_variable_input_ = {true, (static_cast<void>(rest), false)...};
  node->set_ctx_grad_fn(node);
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  node->input_info_.emplace_back(x);
  Tensor y;
  {
    at::AutoGradMode grad_mode(false);
    y = F::forward(&node->ctx_, x, rest...);
  }
  TORCH_INTERNAL_ASSERT(!y.is_view() && !y.is_same(x), "fusedact: a forward kernel returned a view or its input");
  torch::autograd::set_history(y, node);
  node->output_info_.emplace_back(y);
  node->save_variables_to_ctx();
#if FUSEDACT_TORCH_AT_LEAST(2, 14)
  torch::autograd::fire_node_creation_hooks(node);  // torch.autograd.graph.node_creation_hook (2.14)
#endif
  return y;
}

bool wants_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->requires_grad()) return true;
  return false;
}

// Whether the fast path applies: no torch.func transform (functorch's layers are in the
// thread's included dispatch keys, what torch._C._are_functorch_transforms_active reads)
// and no dual tensor of forward-mode AD (a tangent at level 0, the only level
// torch.autograd.forward_ad opens). The C++ Functions have no vmap rule and no JVP; the
// Python Functions do.
bool fast_path_allowed(std::initializer_list<const Tensor*> ts) {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  if (included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
      included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode))
    return false;
  for (const Tensor* t : ts)
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) return false;
  return true;
}

// Each returns None where the fast path does not apply; Python then calls the op.
using Result = c10::optional<Tensor>;

Result swish(const Tensor& x, double beta, const OptTensor& beta_tensor) {
  if (beta_tensor.has_value()) {
    if (!fast_path_allowed({&x, &*beta_tensor})) return c10::nullopt;
    if (wants_grad({&x, &*beta_tensor})) return SwishTensorFunction::apply(x, *beta_tensor);
  } else {
    if (!fast_path_allowed({&x})) return c10::nullopt;
    if (wants_grad({&x})) return beta == 1.0 ? apply_on_x<SiluFunction>(x) : apply_on_x<SwishFunction>(x, beta);
  }
  return below_autograd(ops().swish_fwd, x, beta, beta_tensor);
}

Result mish(const Tensor& x) {
  if (!fast_path_allowed({&x})) return c10::nullopt;
  if (wants_grad({&x})) return apply_on_x<MishFunction>(x);
  return below_autograd(ops().mish_fwd, x);
}

Result hard_swish(const Tensor& x) {
  if (!fast_path_allowed({&x})) return c10::nullopt;
  if (wants_grad({&x})) return apply_on_x<HardSwishFunction>(x);
  return below_autograd(ops().hard_swish_fwd, x);
}

Result acon_c(const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta, int64_t channel_dim) {
  if (!fast_path_allowed({&x, &p1, &p2, &beta})) return c10::nullopt;
  if (wants_grad({&x, &p1, &p2, &beta})) return AconCFunction::apply(x, p1, p2, beta, channel_dim);
  return below_autograd(ops().acon_fwd, x, p1, p2, beta, channel_dim);
}

// batch_norm_act's eager call (fusedact/batch_norm.py checked the arguments): y, or None
// where the fast path does not apply. `act` is the kernel's activation name.
Result batch_norm_act(const Tensor& x, const OptTensor& running_mean, const OptTensor& running_var,
                      const OptTensor& weight, const OptTensor& bias, bool training, double momentum, double eps,
                      const std::string& act, double beta, const OptTensor& p1, const OptTensor& p2,
                      const OptTensor& act_beta) {
  const Tensor none;
  auto t = [&](const OptTensor& o) -> const Tensor& { return o.has_value() ? *o : none; };
  if (!fast_path_allowed({&x, &t(weight), &t(bias), &t(p1), &t(p2), &t(act_beta)})) return c10::nullopt;
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) return c10::nullopt;
  // undefined tensors as None: the Function's inputs are then not variables
  auto o = [](const OptTensor& v) { return v.has_value() && v->defined() ? v : OptTensor(); };
  if (!wants_grad({&x, &t(weight), &t(bias), &t(p1), &t(p2), &t(act_beta)}))  // no graph: the ops alone
    return std::get<0>(BatchNormActFunction::values(x, o(weight), o(bias), o(p1), o(p2), o(act_beta), o(running_mean),
                                                    o(running_var), training, momentum, eps, act, beta));
  return BatchNormActFunction::apply(x, o(weight), o(bias), o(p1), o(p2), o(act_beta), o(running_mean), o(running_var),
                                     training, momentum, eps, act, beta);
}

// ---- swish (float beta), mish and hard_swish as plain CPython functions, which the
// functional API calls first with no Python check (Dynamo traces a stand-in returning
// None: fusedact/functional.py). Their argument checks are here: in Python, with
// pybind11's call on top, they cost more. Each returns None, and Python goes its
// checked way, unless x is exactly a torch.Tensor or Parameter (a subclass may override
// __torch_function__) of a floating dtype and no torch function mode is active.
// Measurements: benchmarks/NOTES.md, "Argument checks in C++".

const Tensor* plain_float_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj) || at::impl::torch_function_mode_enabled()) return nullptr;
  const Tensor& t = THPVariable_Unpack(obj);
  switch (t.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16: return &t;
    default: return nullptr;
  }
}

// Tensors of kReleaseGilBytes or more run with the GIL released, as ATen's own bindings
// run every op, so that other Python threads (a data-loading or logging thread) go on
// during the kernel. Smaller ones keep it: releasing and taking it back costs about as
// much as their kernel. Anything below that needs Python (a dispatch mode, saved-tensor
// or node-creation hooks, anomaly mode's traceback) takes the GIL itself, as it does
// under ATen's ops.
constexpr int64_t kReleaseGilBytes = int64_t(256) << 10;

template <class F>
Result gil_released_if_large(const Tensor& x, F f) {
  if (x.numel() * static_cast<int64_t>(x.element_size()) < kReleaseGilBytes) return f();
  pybind11::gil_scoped_release no_gil;
  return f();
}

PyObject* wrap(Result r) {
  if (!r.has_value()) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(*r));
}

PyObject* py_swish(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 2, "_C.fast.swish(x, beta) takes 2 arguments, got ", nargs);
  const Tensor* x = plain_float_tensor(args[0]);
  if (x == nullptr) Py_RETURN_NONE;
  const double beta = PyFloat_AsDouble(args[1]);  // a float or an int (Python checks which)
  if (beta == -1.0 && PyErr_Occurred()) return nullptr;
  return wrap(gil_released_if_large(*x, [&] { return fusedact::swish(*x, beta, c10::nullopt); }));
  END_HANDLE_TH_ERRORS
}

template <Result (*F)(const Tensor&)>
PyObject* py_unary(PyObject*, PyObject* arg) {
  HANDLE_TH_ERRORS
  const Tensor* x = plain_float_tensor(arg);
  if (x == nullptr) Py_RETURN_NONE;
  return wrap(gil_released_if_large(*x, [&] { return F(*x); }));
  END_HANDLE_TH_ERRORS
}

// ---- batch_norm_act with its argument checks in C++ (fusedact/batch_norm.py calls it
// first): None, and Python checks and goes its way, unless every argument is what the
// CPU's one-call path takes: x a plain floating CPU tensor of (N, C, ...) with more than
// one value a channel, the others None or plain floating CPU (C,) tensors, acon_c's
// beta (C,) or N*C, a float beta within float32's range, no tracer and no mode.

// obj as a plain floating CPU tensor (plain_float_tensor) of n elements (or n2 where
// n2 > 0), in *out; None as undefined where none_ok. False where the fast path does not
// take it.
bool plain_param(PyObject* obj, int64_t n, bool none_ok, Tensor* out, int64_t n2 = 0) {
  if (obj == Py_None) return none_ok;
  const Tensor* t = plain_float_tensor(obj);
  if (t == nullptr || !t->device().is_cpu()) return false;
  const int64_t k = t->numel();
  if (k != n && !(n2 > 0 && k == n2)) return false;
  *out = *t;
  return true;
}

bool plain_float(PyObject* obj, double* out) {
  if (PyFloat_CheckExact(obj)) {
    *out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (!PyLong_CheckExact(obj)) return false;  // not bool (a subclass)
  *out = PyLong_AsDouble(obj);
  if (*out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// Py: batch_norm_act(x, running_mean, running_var, weight, bias, training, momentum,
// eps, act, act_params: tuple) -> y or None
PyObject* py_batch_norm_act(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK(nargs == 10, "_C.fast.batch_norm_act_checked takes 10 arguments, got ", nargs);
  const Tensor* xp = plain_float_tensor(args[0]);
  if (xp == nullptr || torch::jit::tracer::isTracing()) Py_RETURN_NONE;
  const Tensor& x = *xp;
  if (!x.device().is_cpu() || x.dim() < 2 || x.numel() == 0) Py_RETURN_NONE;
  const int64_t N = x.size(0), C = x.size(1);
  Tensor rm, rv, w, b, p[3];
  if (!plain_param(args[1], C, true, &rm) || !plain_param(args[2], C, true, &rv) ||
      !plain_param(args[3], C, true, &w) || !plain_param(args[4], C, true, &b))
    Py_RETURN_NONE;
  for (const Tensor* t : {&rm, &rv, &w, &b})
    if (t->defined() && t->dim() != 1) Py_RETURN_NONE;
  if (args[5] != Py_True && args[5] != Py_False) Py_RETURN_NONE;
  const bool training = args[5] == Py_True;
  double momentum, eps, beta = 1.0;
  if (!plain_float(args[6], &momentum) || !plain_float(args[7], &eps)) Py_RETURN_NONE;
  if (rm.defined() != rv.defined() || (!training && !rm.defined())) Py_RETURN_NONE;
  if (training && x.numel() / C == 1) Py_RETURN_NONE;  // nn.BatchNorm2d's error, raised in Python
  if (!PyUnicode_Check(args[8]) || !PyTuple_CheckExact(args[9])) Py_RETURN_NONE;
  const Py_ssize_t n_params = PyTuple_GET_SIZE(args[9]);
  PyObject* const* params = &PyTuple_GET_ITEM(args[9], 0);
  std::string act;
  if (PyUnicode_CompareWithASCIIString(args[8], "acon_c") == 0) {
    if (n_params != 3) Py_RETURN_NONE;
    for (int j = 0; j < 3; ++j)
      if (!plain_param(params[j], C, false, &p[j], j == 2 && N * C != C ? N * C : 0)) Py_RETURN_NONE;
    act = "acon_c";
  } else if (PyUnicode_CompareWithASCIIString(args[8], "swish") == 0) {
    if (n_params > 1) Py_RETURN_NONE;
    if (n_params == 1 && (!plain_float(params[0], &beta) || !(std::abs(beta) < kFloat32Overflow))) Py_RETURN_NONE;
    act = beta == 1.0 ? "silu" : "swish";
  } else {
    for (const char* name : {"identity", "mish", "hard_swish"})
      if (PyUnicode_CompareWithASCIIString(args[8], name) == 0) act = name;
    if (act.empty() || n_params != 0) Py_RETURN_NONE;
  }
  auto o = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  return wrap(gil_released_if_large(x, [&] {
    return batch_norm_act(x, o(rm), o(rv), o(w), o(b), training, momentum, eps, act, beta, o(p[0]), o(p[1]), o(p[2]));
  }));
  END_HANDLE_TH_ERRORS
}

PyMethodDef fast_methods[] = {
    {"swish", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_swish)), METH_FASTCALL,
     "swish(x, beta: float): y, or None where the fast path does not apply"},
    {"mish", py_unary<mish>, METH_O, "mish(x): y, or None where the fast path does not apply"},
    {"hard_swish", py_unary<hard_swish>, METH_O, "hard_swish(x): y, or None where the fast path does not apply"},
    {"batch_norm_act_checked", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_batch_norm_act)),
     METH_FASTCALL, "batch_norm_act with its checks in C++: y, or None where the fast path does not apply"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void register_fast_path(pybind11::module& m) {
  auto fast = m.def_submodule("fast", "The functional API's fast path to the native ops (csrc/fast_path.cpp).");
  // swish with a tensor beta and acon_c: their Python wrappers check the parameters first
  fast.def("swish_forward", [](const Tensor& x, double beta, const OptTensor& b) {
    return gil_released_if_large(x, [&] { return swish(x, beta, b); });
  });
  fast.def("acon_c_forward", [](const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta, int64_t cd) {
    return gil_released_if_large(x, [&] { return acon_c(x, p1, p2, beta, cd); });
  });
  fast.def("batch_norm_act", [](const Tensor& x, const OptTensor& rm, const OptTensor& rv, const OptTensor& w,
                                const OptTensor& b, bool training, double momentum, double eps, const std::string& act,
                                double beta, const OptTensor& p1, const OptTensor& p2, const OptTensor& act_beta) {
    return gil_released_if_large(
        x, [&] { return batch_norm_act(x, rm, rv, w, b, training, momentum, eps, act, beta, p1, p2, act_beta); });
  });
  fast.def("set_batch_norm_act_vjp", [](pybind11::object fn) { bn_act_vjp() = std::move(fn); });
  if (PyModule_AddFunctions(fast.ptr(), fast_methods) != 0) throw pybind11::error_already_set();
}

}  // namespace fusedact
