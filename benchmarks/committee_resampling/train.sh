source ../../../.venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
v=$1
(python -m so3krates train ${v}_m0.yaml > ${v}_m0.log 2>&1; python -m so3krates train ${v}_m2.yaml > ${v}_m2.log 2>&1) &
(python -m so3krates train ${v}_m1.yaml > ${v}_m1.log 2>&1; python -m so3krates train ${v}_m3.yaml > ${v}_m3.log 2>&1) &
wait
