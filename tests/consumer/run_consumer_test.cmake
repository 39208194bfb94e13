# Installs the MoKA build tree into a scratch prefix, configures and builds
# tests/consumer against it with find_package(Moka), and runs it.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test step failed (${rc}): ${ARGN}\n${err}")
  endif()
endfunction()
run_step(${CMAKE_COMMAND} --install ${MOKA_BINARY_DIR} --prefix ${WORK_DIR}/prefix)
run_step(${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${WORK_DIR}/build -G ${CMAKE_GENERATOR}
  -DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release
  -DMoka_DIR=${WORK_DIR}/prefix/lib/cmake/Moka
  -DKokkos_DIR=${Kokkos_DIR} -DKokkosKernels_DIR=${KokkosKernels_DIR})
run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
# On 2 ranks when an MPI launcher is given (the layer's experts over both).
if(MPIEXEC)
  run_step(${MPIEXEC} ${MPIEXEC_NUMPROC_FLAG} 2 ${WORK_DIR}/build/consumer)
else()
  run_step(${WORK_DIR}/build/consumer)
endif()
