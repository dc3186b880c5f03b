// The numerics the schedules share (sampling.cpp, a1111.cpp, samplers.cpp): numpy's and
// k-diffusion's functions with their roundings.
#pragma once

#include <ATen/Tensor.h>

#include <string>
#include <vector>

namespace sde {

struct SchedulerConfig;

namespace detail {

std::vector<double> np_linspace(double start, double stop, int num);                  // numpy.linspace, float64
std::vector<float> torch_linspace(float start, float stop, int num);                  // torch.linspace, float32
double np_round(double v);                                                            // half to even
inline double f32(double v) { return static_cast<double>(static_cast<float>(v)); }
double interp_index(double x, const std::vector<double> &fp);                         // numpy.interp(x, arange, fp)
double sigma_to_t(double sigma, const std::vector<float> &log_sigmas);                // schedules.sigma_to_t
std::vector<double> sigmas_karras(int n, double sigma_min, double sigma_max, double rho = 7.0);
std::vector<double> sigmas_exponential(int n, double sigma_min, double sigma_max);
// float32 alphas_cumprod of the training schedule (schedules.training_alphas_cumprod).
at::Tensor training_alphas_cumprod(const SchedulerConfig &cfg, bool clamp_zero_snr);
std::vector<double> to_vector(const at::Tensor &t);
// k_diffusion's DiscreteSchedule.sigma_to_t in float32 (a1111.py): fractional timestep of sigma.
float a1111_sigma_to_t(float sigma, const std::vector<float> &log_sigmas);
// Solves A x = b (n x n, row-major) by Gaussian elimination with partial pivoting.
std::vector<double> solve(std::vector<double> a, std::vector<double> b, int n);

}  // namespace detail
}  // namespace sde
