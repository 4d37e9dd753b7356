module fleetplane/bench/loadgen

go 1.22
