// The tile contract as the compiled library sees it. ascend_ffi/__init__.py reads these through
// ctypes, and tests/ops/test_ascend_ffi.py checks them against the Python mirror field by field.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "xyjax/tile_contract.h"

#ifdef XYJAX_HAVE_XLA_FFI
#include "xla/ffi/api/c_api.h"
#endif

#define XYJAX_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Named {
  const char* name;
  int32_t value;
};

// Names are the lowercase struct member names, in field order.
constexpr Named kFields[] = {
    {"seq", XYJAX_TASK_SEQ},
    {"q_start", XYJAX_TASK_Q_START},
    {"q_len", XYJAX_TASK_Q_LEN},
    {"q_pos", XYJAX_TASK_Q_POS},
    {"kv_start", XYJAX_TASK_KV_START},
    {"kv_end", XYJAX_TASK_KV_END},
    {"kv_head", XYJAX_TASK_KV_HEAD},
    {"mask_kind", XYJAX_TASK_MASK_KIND},
    {"mask_base", XYJAX_TASK_MASK_BASE},
    {"split", XYJAX_TASK_SPLIT},
    {"num_splits", XYJAX_TASK_NUM_SPLITS},
};

constexpr Named kMaskKinds[] = {
    {"causal", XYJAX_MASK_CAUSAL},
    {"tree", XYJAX_MASK_TREE},
};

static_assert(sizeof(kFields) / sizeof(kFields[0]) == XYJAX_TASK_NUM_FIELDS,
              "every task field needs a name");
static_assert(sizeof(kMaskKinds) / sizeof(kMaskKinds[0]) == XYJAX_MASK_NUM_KINDS,
              "every mask kind needs a name");

// The struct members sit at the enum's indices.
#define XYJAX_CHECK_OFFSET(member, field) \
  static_assert(offsetof(XyjaxTask, member) == (field) * sizeof(int32_t), #member)
XYJAX_CHECK_OFFSET(seq, XYJAX_TASK_SEQ);
XYJAX_CHECK_OFFSET(q_start, XYJAX_TASK_Q_START);
XYJAX_CHECK_OFFSET(q_len, XYJAX_TASK_Q_LEN);
XYJAX_CHECK_OFFSET(q_pos, XYJAX_TASK_Q_POS);
XYJAX_CHECK_OFFSET(kv_start, XYJAX_TASK_KV_START);
XYJAX_CHECK_OFFSET(kv_end, XYJAX_TASK_KV_END);
XYJAX_CHECK_OFFSET(kv_head, XYJAX_TASK_KV_HEAD);
XYJAX_CHECK_OFFSET(mask_kind, XYJAX_TASK_MASK_KIND);
XYJAX_CHECK_OFFSET(mask_base, XYJAX_TASK_MASK_BASE);
XYJAX_CHECK_OFFSET(split, XYJAX_TASK_SPLIT);
XYJAX_CHECK_OFFSET(num_splits, XYJAX_TASK_NUM_SPLITS);
#undef XYJAX_CHECK_OFFSET

template <size_t N>
int32_t IndexOf(const Named (&table)[N], const char* name) {
  if (name == nullptr) return -1;
  for (const Named& entry : table) {
    if (std::strcmp(entry.name, name) == 0) return entry.value;
  }
  return -1;
}

template <size_t N>
const char* NameOf(const Named (&table)[N], int32_t value) {
  for (const Named& entry : table) {
    if (entry.value == value) return entry.name;
  }
  return nullptr;
}

}  // namespace

XYJAX_EXPORT int32_t xyjax_ffi_abi_version(void) { return XYJAX_TILE_ABI_VERSION; }

XYJAX_EXPORT int32_t xyjax_tile_num_fields(void) { return XYJAX_TASK_NUM_FIELDS; }

XYJAX_EXPORT int32_t xyjax_tile_row_bytes(void) { return static_cast<int32_t>(sizeof(XyjaxTask)); }

// Index of the field called `name` ("seq", "q_start", ...), or -1.
XYJAX_EXPORT int32_t xyjax_tile_field_index(const char* name) { return IndexOf(kFields, name); }

// Name of the field at `index`, or NULL.
XYJAX_EXPORT const char* xyjax_tile_field_name(int32_t index) { return NameOf(kFields, index); }

XYJAX_EXPORT int32_t xyjax_tile_num_mask_kinds(void) { return XYJAX_MASK_NUM_KINDS; }

// Value of the mask kind called `name` ("causal", "tree"), or -1.
XYJAX_EXPORT int32_t xyjax_tile_mask_kind(const char* name) { return IndexOf(kMaskKinds, name); }

// Name of the mask kind `value`, or NULL.
XYJAX_EXPORT const char* xyjax_tile_mask_kind_name(int32_t value) {
  return NameOf(kMaskKinds, value);
}

// 1 and the XLA FFI C API version the library was compiled against, or 0 when it was built
// without the XLA FFI headers (then it has no jax.ffi handlers).
XYJAX_EXPORT int32_t xyjax_ffi_xla_api_version(int32_t* major, int32_t* minor) {
#ifdef XYJAX_HAVE_XLA_FFI
  if (major != nullptr) *major = XLA_FFI_API_MAJOR;
  if (minor != nullptr) *minor = XLA_FFI_API_MINOR;
  return 1;
#else
  if (major != nullptr) *major = -1;
  if (minor != nullptr) *minor = -1;
  return 0;
#endif
}
