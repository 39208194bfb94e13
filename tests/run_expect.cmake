# Runs COMMAND (a ;-list) and checks its exit status and output.
#   -DCOMMAND=arg0@@arg1@@... -DEXPECT=success|failure -DREGEX=<must appear in stdout+stderr>
string(REPLACE "@@" ";" COMMAND "${COMMAND}")
execute_process(COMMAND ${COMMAND} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(EXPECT STREQUAL "failure" AND rc EQUAL 0)
  message(FATAL_ERROR "expected a non-zero exit status, got 0")
elseif(EXPECT STREQUAL "success" AND NOT rc EQUAL 0)
  message(FATAL_ERROR "expected exit status 0, got ${rc}")
endif()
if(NOT "${out}${err}" MATCHES "${REGEX}")
  message(FATAL_ERROR "output does not match '${REGEX}'")
endif()
message("run_expect: ok (exit status ${rc})")
