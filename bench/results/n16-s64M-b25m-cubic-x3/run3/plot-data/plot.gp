
set terminal pngcairo size 1100,1250 font ',10'
set output 'bench/results/n16-s64M-b25m-cubic-x3/run3/cdf.png'
set multiplot layout 3,1 title 'bay swarm benchmark: N=16, S=64.0 MiB, B=25 Mbit/s per link, T*=S/B=21.5 s'
set grid
set key left top
set logscale x
set format x '%g'
set xtics (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
set mxtics 10
set xrange [2.68:413.50]
set yrange [0:1.02]
set xlabel 'completion time since all pulls started (s, log scale)'
set ylabel 'fraction of nodes done'
set title 'completion-time CDF'
set arrow 1 from 21.477, graph 0 to 21.477, graph 1 nohead dt 2 lw 2 lc rgb 'black'
set label 1 'T*' at 21.477, graph 1.03 center
set arrow 2 from 27.920, graph 0 to 27.920, graph 1 nohead dt 3 lc rgb '#2ca02c'
set label 2 '1.3T*' at 27.920, graph 0.05 left offset 0.3,0 tc rgb '#2ca02c'
set arrow 3 from 49.397, graph 0 to 49.397, graph 1 nohead dt 3 lc rgb '#1f77b4'
set label 3 '2.3T*' at 49.397, graph 0.05 left offset 0.3,0 tc rgb '#1f77b4'
set arrow 4 from 343.633, graph 0 to 343.633, graph 1 nohead dt 3 lc rgb '#d62728'
set label 4 'N·T*' at 343.633, graph 0.05 left offset 0.3,0 tc rgb '#d62728'
plot 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/direct-cdf.dat' using 1:2 with lines lw 2 lc rgb '#d62728' title 'direct (max 359.6 s)', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/cold-cdf.dat' using 1:2 with lines lw 2 lc rgb '#1f77b4' title 'cold (max 35.7 s)', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/warm-cdf.dat' using 1:2 with lines lw 2 lc rgb '#2ca02c' title 'warm (max 29.6 s)'
unset arrow; unset label; unset logscale x; unset xtics; set xtics; set mxtics default
set xrange [0:40.3]
set yrange [0:105]
set title 'CPU busy, all 2 cores (sampled every 0.5 s); direct runs on to 360 s'
set ylabel 'CPU busy %'
set xlabel 'time since the pulls started (s)'
plot 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/direct-series.dat' using 1:2 with lines lw 1.5 lc rgb '#d62728' title 'direct', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/cold-series.dat' using 1:2 with lines lw 1.5 lc rgb '#1f77b4' title 'cold', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/warm-series.dat' using 1:2 with lines lw 1.5 lc rgb '#2ca02c' title 'warm'
set yrange [0:*]
set title 'sum of node download rates, % of N x B'
set ylabel '% of N x B'
plot 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/direct-series.dat' using 1:3 with lines lw 1.5 lc rgb '#d62728' title 'direct', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/cold-series.dat' using 1:3 with lines lw 1.5 lc rgb '#1f77b4' title 'cold', 'bench/results/n16-s64M-b25m-cubic-x3/run3/plot-data/warm-series.dat' using 1:3 with lines lw 1.5 lc rgb '#2ca02c' title 'warm'
unset multiplot
