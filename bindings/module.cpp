// The extension module biastransfer._C: exception translation, build facts, then every topic.
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>

#include <filesystem>

#include "bindings.h"
#include "libtransfer/errors.h"
#include "libtransfer/version.h"

namespace py = pybind11;

namespace {

// Our typed errors and torch's TORCH_CHECK failures become the Python exceptions a user expects,
// without the C++ backtrace that c10::Error::what() carries.
void translate_exceptions(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const libtransfer::InvalidInput& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const libtransfer::FileError& e) {
    PyErr_SetString(PyExc_OSError, e.what());
  } catch (const libtransfer::WrongType& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::filesystem::filesystem_error& e) {
    // std::filesystem refused (creating a checkpoint folder where a file is, ...): OSError with
    // the errno, which Python turns into NotADirectoryError, PermissionError, ...; the message
    // names the path.
    PyObject* arguments = Py_BuildValue("(is)", e.code().value(), e.what());
    PyErr_SetObject(PyExc_OSError, arguments);
    Py_XDECREF(arguments);
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "biastransfer's compiled core (libtransfer).";
  py::register_exception_translator(&translate_exceptions);
  m.attr("__version__") = libtransfer::version();
  m.attr("built_with_torch") = libtransfer::built_with_torch();

  libtransfer::bindings::bind_safetensors(m);
  libtransfer::bindings::bind_tokenizer(m);
  libtransfer::bindings::bind_data(m);
  libtransfer::bindings::bind_stats(m);
  libtransfer::bindings::bind_fingerprint(m);
  libtransfer::bindings::bind_fingerprint_inputs(m);
  libtransfer::bindings::bind_detect(m);
  libtransfer::bindings::bind_models(m);
  libtransfer::bindings::bind_sampler(m);
  libtransfer::bindings::bind_filters(m);
  libtransfer::bindings::bind_datasets(m);
  libtransfer::bindings::bind_losses(m);
  libtransfer::bindings::bind_trainer(m);
  libtransfer::bindings::bind_detect_weights(m);
  libtransfer::bindings::bind_detect_probes(m);
}
