// Planted bug for the ASan leg of scripts/sanitizers.sh: a heap buffer over-read by one element.
// The leg fails unless AddressSanitizer reports it ("heap-buffer-overflow") and the program exits non-zero,
// so that a clean sanitizer run of the real tests means the sanitizer was actually active.
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  (void)argv;
  std::vector<float>* v = new std::vector<float>(static_cast<size_t>(16 + argc - 1), 1.0f);
  volatile size_t i = v->size();  // one past the end, hidden from the optimizer
  const float x = v->data()[i];   // heap-buffer-overflow READ of 4 bytes
  std::printf("planted_oob read %f: the sanitizer did not catch it\n", static_cast<double>(x));
  delete v;
  return 0;
}
