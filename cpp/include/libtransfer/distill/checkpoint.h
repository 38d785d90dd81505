// Training checkpoints: one safetensors file per checkpoint holding the model's parameters and
// buffers ("model.<name>"), the optimizer's moments ("optimizer.<name>.exp_avg", ...) and the
// trainer's state as metadata, plus a CRC-32 of every tensor's bytes so that a damaged file is
// refused instead of silently loaded. Files are written atomically (io::write_safetensors), named
// step-<8 digits>.safetensors inside a checkpoint directory.
//
// Costs: saving copies every tensor to the CPU once; loading validates the whole file (header,
// checksums, names, shapes) into temporary tensors before touching the model, so a refused file
// leaves the model and optimizer exactly as they were.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "libtransfer/distill/optimizer.h"
#include "libtransfer/models/model.h"

namespace libtransfer::distill {

// Metadata key saying a file is a libtransfer checkpoint, and the format version it holds.
inline constexpr const char* kCheckpointFormatKey = "libtransfer.checkpoint";
inline constexpr const char* kCheckpointFormatVersion = "1";

// What the trainer needs besides tensors to continue a run exactly.
struct TrainerState {
  std::int64_t step = 0;          // completed optimizer steps (the optimizer's t)
  std::uint64_t seed = 0;         // the run's seed (a resume with another seed is refused)
  std::int64_t accumulation = 1;  // micro-batches per step (a resume with another is refused)
  std::int64_t total_steps = 0;   // the run's planned length (the schedule depends on it)
  double elapsed_s = 0.0;         // training time so far, continued by a resumed run
};

// dir + "/step-<8-digit step>.safetensors".
std::string checkpoint_path(const std::string& dir, std::int64_t step);

// Writes model, optimizer and state to `path` atomically. FileError if it cannot be written.
void save_checkpoint(const std::string& path, models::Model& model, const AdamW& optimizer,
                     const TrainerState& state);

// Reads and validates a checkpoint, then loads it into `model` and `optimizer`. Throws (naming
// the file) before changing anything: FileError if it cannot be opened; InvalidInput for a
// truncated or garbage file, a file that is no libtransfer checkpoint, a checksum mismatch, or a
// tensor missing, extra or shaped differently from the model's (naming the tensor and both
// shapes).
TrainerState load_checkpoint(const std::string& path, models::Model& model, AdamW& optimizer);

// A checkpoint file found in a directory.
struct CheckpointEntry {
  std::string path;
  std::int64_t step = 0;
};

// Files named step-<digits>.safetensors in `dir`, oldest (smallest step) first; empty if the
// directory does not exist. Other files are ignored (temporary files of interrupted writes too).
std::vector<CheckpointEntry> list_checkpoints(const std::string& dir);

// Deletes all but the `keep` newest checkpoints (keep <= 0 keeps all).
void prune_checkpoints(const std::string& dir, std::int64_t keep);

}  // namespace libtransfer::distill
